"""LoRA adapters (tfsft.lora): the layer, freezing, merging, the adapter-only save and a whole run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tfsft.data import LabelMap
from tfsft.errors import ArtifactError, ConfigError

LABELS = LabelMap(("0", "1"))


def _features(model):
    from tfsft.modeling import feature_names, tf

    rng = np.random.RandomState(1)
    ids = rng.randint(1000, 5000, size=(3, 7))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = np.ones_like(ids)
    mask[0, 5:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {name: tf.constant(values[name]) for name in feature_names(model)}


def _logits(model, features) -> np.ndarray:
    return model(features, training=False).logits.numpy()


def test_lora_dense_computes_base_plus_scaled_low_rank_update():
    from tfsft.lora import LoraDense
    from tfsft.modeling import tf

    rng = np.random.RandomState(0)
    dense = tf.keras.layers.Dense(3, name="query")
    dense.build((None, 4))
    kernel, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    dense.set_weights([kernel, bias])
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)
    layer = LoraDense(dense, rank=2, scale=8.0 / 2, dropout=0.0)
    np.testing.assert_allclose(layer(x).numpy(), x @ kernel + bias, rtol=1e-5, atol=1e-5)  # B starts at zero
    a, b = rng.normal(size=(4, 2)), rng.normal(size=(2, 3))
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    expected = x @ kernel + bias + 4.0 * (x @ a) @ b
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-5)  # dropout 0
    np.testing.assert_allclose(x @ layer.merged_kernel() + bias, expected, rtol=1e-5, atol=1e-5)
    assert [w.name for w in layer.trainable_weights] == ["query/lora_a:0", "query/lora_b:0"]
    assert abs(float(layer.lora_a.numpy().max())) <= 1 / np.sqrt(4)


def test_apply_lora_freezes_the_encoder_starts_as_the_checkpoint_and_merges_back(tiny_checkpoint):
    from tfsft.lora import LoraDense, LoraSettings, apply_lora, merge_lora, parameter_counts
    from tfsft.modeling import build_classifier

    model, _ = build_classifier(tiny_checkpoint, LABELS)
    features = _features(model)
    before, full = _logits(model, features), parameter_counts(model)
    plain_names = sorted(w.name for w in model.weights)
    assert apply_lora(model, LoraSettings(rank=4, alpha=8.0, dropout=0.0, targets=("query", "value"))) == 4
    trainable = sorted(w.name.split("/", 1)[1] for w in model.trainable_weights)
    assert trainable == sorted(
        [f"bert/encoder/layer_._{i}/attention/self/{t}/lora_{ab}:0" for i in (0, 1) for t in ("query", "value") for ab in "ab"]
        + ["classifier/kernel:0", "classifier/bias:0"]
    )
    counts = parameter_counts(model)
    adapters = 4 * (32 * 4 + 4 * 32)
    assert counts == {"trainable_parameters": adapters + 32 * 2 + 2, "total_parameters": full["total_parameters"] + adapters}
    np.testing.assert_array_equal(_logits(model, features), before)

    rng = np.random.RandomState(2)
    for weight in model.trainable_weights:
        if "lora_b" in weight.name:
            weight.assign(rng.normal(scale=0.5, size=weight.shape))
    unmerged = _logits(model, features)
    assert np.abs(unmerged - before).max() > 1e-4
    assert merge_lora(model) == 4
    np.testing.assert_allclose(_logits(model, features), unmerged, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(layer, LoraDense) for layer in model.submodules)
    assert sorted(w.name for w in model.weights) == plain_names
    assert parameter_counts(model) == full


def test_unknown_targets_name_the_layers_there_are(tiny_checkpoint):
    from tfsft.lora import LoraSettings, apply_lora
    from tfsft.modeling import build_classifier

    model, _ = build_classifier(tiny_checkpoint, LABELS)
    with pytest.raises(ConfigError, match=r"no dense layer named \['q_proj'\].*'query'"):
        apply_lora(model, LoraSettings(rank=2, alpha=2.0, dropout=0.0, targets=("query", "q_proj")))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_checkpoint, sst2_slices):
    from tfsft import RunConfig, finetune

    output_dir = tmp_path_factory.mktemp("lora") / "run"
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), num_train_epochs=2, learning_rate=1e-2, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, output_dir=str(output_dir), export=True,
        lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, export_variants="fused",
    ))
    return finetune(config, verbose=0)


def test_lora_run_stores_adapters_and_head_only_and_exports_them_merged(lora_run, tiny_checkpoint, sst2_slices):
    from tfsft import artifacts
    from tfsft.inference import Predictor
    from tfsft.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, load_run_model
    from tfsft.config import DataConfig
    from tfsft.data import LengthBatchedData, read_examples
    from tfsft.evaluation import predict_logits
    from tfsft.modeling import load_finetuned
    from tfsft.tokenize import TextEncoder

    run, metrics = lora_run.run_dir, lora_run.metrics
    model_dir = run / "model"
    assert not (model_dir / "tf_model.h5").exists()
    adapter = json.loads((model_dir / ADAPTER_CONFIG_FILE).read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (4, 8.0, ["query", "value"])
    assert adapter["modules_to_save"] == ["classifier"]
    assert adapter["base_checkpoint"] == str(tiny_checkpoint.resolve())
    assert (model_dir / ADAPTER_WEIGHTS_FILE).stat().st_size < 0.05 * (tiny_checkpoint / "tf_model.h5").stat().st_size
    assert metrics["trainable_parameters"] == 4 * (32 * 4 + 4 * 32) + 32 * 2 + 2
    assert metrics["total_parameters"] > 900 * metrics["trainable_parameters"]
    assert artifacts.read_config(run).model.lora_rank == 4
    with pytest.raises(ArtifactError, match="LoRA adapter.*load_run_model"):
        load_finetuned(model_dir)

    model = load_run_model(model_dir)
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    assert report["parity"]["model.fused.onnx"]["batch_8"]["max_abs_logit_diff"] < 1e-4
    texts = read_examples(str(sst2_slices["dev"]), DataConfig()).texts[:16]
    encoder = TextEncoder.from_file(run / "onnx" / artifacts.BUNDLE_TOKENIZER, 64)
    keras = predict_logits(model, LengthBatchedData(encoder.encode(texts), None, 4, shuffle=False, pad_id=encoder.pad_id))
    np.testing.assert_allclose(Predictor(run / "onnx").logits(texts), keras, atol=1e-4)


def test_lora_training_moves_adapters_and_head_and_never_the_frozen_encoder(lora_run, tiny_checkpoint):
    from tfsft.lora import load_adapter
    from tfsft.modeling import build_classifier

    trained = load_adapter(lora_run.run_dir / "model", merge=False)
    base, _ = build_classifier(tiny_checkpoint, LABELS)
    base_weights = {w.name.split("/", 1)[1]: w.numpy() for w in base.weights}
    for weight in trained.weights:
        name = weight.name.split("/", 1)[1]
        if "lora_" in name:
            continue
        if name.startswith("classifier/"):
            assert not np.array_equal(weight.numpy(), base_weights[name]), name
        else:
            np.testing.assert_array_equal(weight.numpy(), base_weights[name], err_msg=name)
    assert all(np.abs(w.numpy()).max() > 0 for w in trained.trainable_weights if "lora_b" in w.name)


def test_evaluate_reloads_the_adapter_on_its_base(lora_run, sst2_slices):
    from tfsft.pipeline import evaluate_run

    metrics = evaluate_run(str(lora_run.run_dir), str(sst2_slices["dev"]))
    assert metrics["eval_accuracy"] == pytest.approx(lora_run.metrics["eval_accuracy"], abs=1e-9)


def test_an_adapter_without_its_base_or_on_another_base_is_refused(lora_run, tiny_checkpoint, tmp_path):
    from tfsft.lora import ADAPTER_CONFIG_FILE, load_run_model

    model_dir = tmp_path / "model"
    shutil.copytree(lora_run.run_dir / "model", model_dir)
    config = json.loads((model_dir / ADAPTER_CONFIG_FILE).read_text())

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_checkpoint, other_base)
    with open(other_base / "tf_model.h5", "ab") as handle:
        handle.write(b"\0")
    (model_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "base_checkpoint": str(other_base)}))
    with pytest.raises(ArtifactError, match="holds different weights"):
        load_run_model(model_dir)

    gone = {**config, "base_checkpoint": str(tmp_path / "gone"), "base_model_name_or_path": str(tmp_path / "gone")}
    (model_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(gone))
    with pytest.raises(ArtifactError, match=r"a LoRA adapter, which needs its base checkpoint.*not found.*ONNX bundle"):
        load_run_model(model_dir)

    (model_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps({**config, "r": "eight"}))
    with pytest.raises(ArtifactError, match="unreadable adapter config"):
        load_run_model(model_dir)


@pytest.mark.parametrize("model_type, adapted", [
    ("roberta", 4), ("distilbert", 4), ("electra", 4), ("albert", 2), ("mpnet", 4),
])
def test_default_targets_of_each_family_adapt_and_merge(model_type, adapted):
    """The default --lora_targets name each family's query and value layers; ALBERT shares its
    layers across blocks, so one adapter serves both."""
    from transformers import AutoConfig, TFAutoModelForSequenceClassification

    from tfsft.config import ModelConfig
    from tfsft.lora import LoraSettings, apply_lora, merge_lora
    from tfsft.modeling import quiet_transformers

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=200)
    if model_type == "distilbert":
        sizes = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=200)
    if model_type == "albert":
        sizes["embedding_size"] = 16
    with quiet_transformers():
        model = TFAutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, num_labels=2, **sizes))
        model(model.dummy_inputs, training=False)
    features = {name: value for name, value in model.dummy_inputs.items()}
    before = _logits(model, features)
    settings = LoraSettings.from_config(ModelConfig(lora_rank=2), model_type)
    assert apply_lora(model, settings) == adapted
    np.testing.assert_array_equal(_logits(model, features), before)
    rng = np.random.RandomState(0)
    for weight in model.trainable_weights:
        if "lora_b" in weight.name:
            weight.assign(rng.normal(size=weight.shape))
    unmerged = _logits(model, features)
    assert np.abs(unmerged - before).max() > 1e-4
    merge_lora(model)
    np.testing.assert_allclose(_logits(model, features), unmerged, rtol=1e-4, atol=1e-5)


def test_a_model_type_without_default_targets_needs_lora_targets():
    from tfsft.config import ModelConfig
    from tfsft.lora import LoraSettings

    with pytest.raises(ConfigError, match="name the dense layers to adapt with --lora_targets"):
        LoraSettings.from_config(ModelConfig(lora_rank=8), "gpt2")
    settings = LoraSettings.from_config(ModelConfig(lora_rank=8, lora_targets="c_attn, c_proj"), "gpt2")
    assert settings.targets == ("c_attn", "c_proj") and settings.scale == 16.0 / 8
