import numpy as np
import pytest

from tfsft.data import LabelMap
from tfsft.errors import ArtifactError
from tfsft.modeling import build_classifier, embedded_checkpoint, feature_names, resolve_checkpoint


def test_tiny_checkpoint_gets_a_fresh_head_only(tiny_checkpoint):
    model, report = build_classifier(tiny_checkpoint, LabelMap(("neg", "pos")))
    assert report.weights_file == "tf_model.h5"
    assert report.newly_initialized == ("classifier",)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert feature_names(model) == ("input_ids", "attention_mask", "token_type_ids")


@pytest.mark.slow
def test_embedded_minilm_loads_every_encoder_weight_from_safetensors():
    """Its pooler was never trained (it pooled by mean), so the default head leaves it out."""
    from safetensors.numpy import load_file

    checkpoint = embedded_checkpoint()
    model, report = build_classifier(checkpoint, LabelMap(("a", "b", "c")))
    assert report.weights_file == "model.safetensors"
    assert report.pooling == "mean"
    assert set(report.newly_initialized) == {"classifier.weight", "classifier.bias"}
    assert set(report.unused) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    state = load_file(str(checkpoint / "model.safetensors"))
    encoder_weights = [w for w in model.weights if "classifier" not in w.name]
    assert len(encoder_weights) == len(state) - len(report.unused)
    by_name = {w.name: w.numpy() for w in model.weights}
    query = next(v for k, v in by_name.items() if "layer_._5/attention/self/query/kernel" in k)
    np.testing.assert_array_equal(query, state["encoder.layer.5.attention.self.query.weight"].T)
    word_embeddings = next(v for k, v in by_name.items() if "word_embeddings/weight" in k)
    np.testing.assert_array_equal(word_embeddings, state["embeddings.word_embeddings.weight"])


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(ArtifactError, match="checkpoint directory not found"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ArtifactError, match="config.json missing"):
        resolve_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 10}')
    with pytest.raises(ArtifactError, match="no TensorFlow-loadable weights"):
        build_classifier(resolve_checkpoint(str(tmp_path)), LabelMap(("a", "b")))


def test_corrupt_weights_file_is_an_artifact_error(tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "tf_model.h5").write_bytes(b"\x89HDF\r\n garbage")
    with pytest.raises(ArtifactError, match="tf_model.h5"):
        build_classifier(broken, LabelMap(("a", "b")))


ARCHITECTURES = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, pad_token_id=0),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "electra": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "albert": dict(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
}


def finetune_briefly(checkpoint, sst2_slices, output_dir):
    """A short `finetune` of `checkpoint` on 64 SST-2 examples, without export."""
    from tfsft import RunConfig, finetune

    return finetune(
        RunConfig.from_flat(dict(
            model_name_or_path=str(checkpoint), train_file=str(sst2_slices["train"]),
            validation_file=str(sst2_slices["dev"]), max_train_samples=64, max_eval_samples=32,
            output_dir=str(output_dir), export=False,
        )),
        verbose=0,
    )


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_bert_family_architectures_train_through_the_same_path(model_type, tiny_checkpoint, sst2_slices, tmp_path):
    import shutil

    from transformers import AutoConfig, TFAutoModel

    from conftest import TOKENIZER_FILES

    checkpoint = tmp_path / model_type
    config = AutoConfig.for_model(model_type, vocab_size=30522, max_position_embeddings=512, **ARCHITECTURES[model_type])
    encoder = TFAutoModel.from_config(config)
    encoder(encoder.dummy_inputs)
    encoder.save_pretrained(str(checkpoint))
    for name in TOKENIZER_FILES:
        shutil.copy(tiny_checkpoint / name, checkpoint / name)
    result = finetune_briefly(checkpoint, sst2_slices, tmp_path / "run")
    assert result.metrics["eval_samples"] == 32
    new = result.metrics["newly_initialized"]
    assert any("classifier" in name for name in new)
    assert not [name for name in new if any(part in name for part in ("embeddings", "encoder", "transformer", "layer_"))]


def sentence_transformers_checkpoint(source, target, **modes):
    """A copy of `source` laid out as a sentence-transformers model whose Pooling module has `modes`."""
    import json
    import shutil

    shutil.copytree(source, target)
    (target / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (target / "1_Pooling").mkdir()
    (target / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    return target


def test_checkpoint_pooling_follows_the_sentence_transformers_pooling_module(tiny_checkpoint, tmp_path):
    from tfsft.modeling import checkpoint_pooling

    assert checkpoint_pooling(tiny_checkpoint) == "cls"
    mean = sentence_transformers_checkpoint(tiny_checkpoint, tmp_path / "mean", pooling_mode_mean_tokens=True,
                                            pooling_mode_cls_token=False)
    assert checkpoint_pooling(mean) == "mean"
    both = sentence_transformers_checkpoint(tiny_checkpoint, tmp_path / "both", pooling_mode_mean_tokens=True,
                                            pooling_mode_max_tokens=True)
    assert checkpoint_pooling(both) == "cls"
    (mean / "1_Pooling" / "config.json").write_text("{not json")
    assert checkpoint_pooling(mean) == "cls"


def test_a_model_fine_tuned_by_tfsft_keeps_its_pooling_as_a_checkpoint(tiny_checkpoint, tmp_path):
    """Fine-tuning again from a finished run (say STS-B, then MRPC) keeps the head's pooling."""
    from tfsft.modeling import checkpoint_pooling, load_tokenizer, save_pretrained

    model = mean_pooled(tiny_checkpoint)
    save_pretrained(model, load_tokenizer(tiny_checkpoint), tmp_path / "stage1")
    assert checkpoint_pooling(tmp_path / "stage1") == "mean"
    again, report = build_classifier(tmp_path / "stage1", LabelMap(("a", "b", "c")))
    assert report.pooling == "mean"
    assert report.newly_initialized == ("classifier/bias:0", "classifier/kernel:0")
    encoder = {w.name.split("/", 1)[1]: w.numpy() for w in model.weights if "classifier" not in w.name}
    for weight in again.weights:
        if "classifier" not in weight.name:
            np.testing.assert_array_equal(weight.numpy(), encoder[weight.name.split("/", 1)[1]])


def test_auto_pooling_is_mean_for_the_embedded_minilm_and_cls_for_tagging():
    from tfsft.modeling import resolve_pooling

    checkpoint = embedded_checkpoint()
    assert resolve_pooling("auto", checkpoint, "bert", "classification") == "mean"
    assert resolve_pooling("auto", checkpoint, "bert", "regression") == "mean"
    assert resolve_pooling("auto", checkpoint, "bert", "ner") == "cls"
    assert resolve_pooling("auto", checkpoint, "distilbert", "classification") == "cls"
    assert resolve_pooling("cls", checkpoint, "bert", "classification") == "cls"


def test_mean_pooling_is_refused_where_it_cannot_apply(tiny_checkpoint):
    from tfsft.config import RunConfig
    from tfsft.errors import ConfigError
    from tfsft.modeling import resolve_pooling

    with pytest.raises(ConfigError, match="model_type=distilbert"):
        resolve_pooling("mean", tiny_checkpoint, "distilbert", "classification")
    with pytest.raises(ConfigError, match="--pooling"):
        RunConfig.from_flat(dict(task="ner", pooling="mean", train_file="x.conll"))
    with pytest.raises(ConfigError, match="--pooling"):
        RunConfig.from_flat(dict(pooling="max"))


def mean_pooled(tiny_checkpoint):
    model, report = build_classifier(tiny_checkpoint, LabelMap(("neg", "pos")), pooling="mean")
    assert report.pooling == "mean"
    assert report.newly_initialized == ("classifier",)
    assert not [w.name for w in model.weights if "pooler" in w.name]
    return model


def test_mean_pooled_head_reads_the_masked_mean_of_the_last_hidden_states(tiny_checkpoint):
    import tensorflow as tf

    model = mean_pooled(tiny_checkpoint)
    ids = np.array([[101, 2204, 3185, 102, 0, 0], [101, 2919, 102, 0, 0, 0]], dtype=np.int32)
    inputs = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32), "token_type_ids": np.zeros_like(ids)}
    hidden = model.bert(**inputs, training=False).last_hidden_state.numpy()
    lengths = inputs["attention_mask"].sum(axis=1)
    expected_pooled = np.stack([hidden[i, :n].mean(axis=0) for i, n in enumerate(lengths)])
    kernel, bias = (w.numpy() for w in model.classifier.weights)
    logits = model(inputs, training=False).logits.numpy()
    np.testing.assert_allclose(logits, expected_pooled @ kernel + bias, atol=1e-5)

    shorter = {name: value[:1, :4] for name, value in inputs.items()}
    np.testing.assert_allclose(model(shorter, training=False).logits.numpy(), logits[:1], atol=1e-5)
    assert tf.reduce_any(tf.abs(model(inputs, training=True).logits - logits) > 1e-6)


def test_mean_pooled_model_saves_and_reloads_with_its_pooling(tiny_checkpoint, tmp_path):
    import json

    from tfsft.modeling import POOLING_ATTRIBUTE, load_finetuned, load_tokenizer, save_pretrained

    model = mean_pooled(tiny_checkpoint)
    save_pretrained(model, load_tokenizer(tiny_checkpoint), tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())[POOLING_ATTRIBUTE] == "mean"
    reloaded = load_finetuned(tmp_path / "model")
    assert type(reloaded) is type(model)
    inputs = {name: np.array([[101, 2204, 3185, 102, 0]], dtype=np.int32) for name in ("input_ids",)}
    inputs["attention_mask"] = (inputs["input_ids"] > 0).astype(np.int32)
    inputs["token_type_ids"] = np.zeros_like(inputs["input_ids"])
    np.testing.assert_allclose(reloaded(inputs).logits.numpy(), model(inputs).logits.numpy(), atol=1e-6)


def test_finetune_records_the_pooling_it_resolved(tiny_checkpoint, sst2_slices, tmp_path):
    import json

    from tfsft.modeling import POOLING_ATTRIBUTE

    checkpoint = sentence_transformers_checkpoint(tiny_checkpoint, tmp_path / "st", pooling_mode_mean_tokens=True)
    result = finetune_briefly(checkpoint, sst2_slices, tmp_path / "run")
    saved = json.loads((result.run_dir / "model" / "config.json").read_text())
    assert saved[POOLING_ATTRIBUTE] == "mean"
    assert json.loads((result.run_dir / "config.json").read_text())["model"]["pooling"] == "auto"


def save_mean_pooled(tiny_checkpoint, directory):
    from tfsft.modeling import load_tokenizer, save_pretrained

    model = mean_pooled(tiny_checkpoint)
    save_pretrained(model, load_tokenizer(tiny_checkpoint), directory)
    return model


TOKENS = {"input_ids": np.array([[101, 2204, 3185, 102, 0]], dtype=np.int32),
          "attention_mask": np.array([[1, 1, 1, 1, 0]], dtype=np.int32),
          "token_type_ids": np.zeros((1, 5), dtype=np.int32)}


def test_transformers_auto_classes_refuse_a_mean_pooled_model_unless_tfsft_registered_it(tiny_checkpoint, tmp_path):
    """transformers' auto classes would build a [CLS]-pooler head with a random pooler and no
    error: the saved config names a model type they do not know, so without tfsft they fail
    loudly; once tfsft.modeling is imported (it registers the type) they load the right head.
    The tokenizer loads with plain transformers either way."""
    import subprocess
    import sys

    import numpy as np
    from transformers import AutoTokenizer, TFAutoModelForSequenceClassification

    from tfsft.modeling import MEAN_POOLED_MODEL_TYPE, load_finetuned

    save_mean_pooled(tiny_checkpoint, tmp_path / "model")
    without_tfsft = subprocess.run(
        [sys.executable, "-c",
         "import os; os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
         "from transformers import TFAutoModelForSequenceClassification as Auto\n"
         f"Auto.from_pretrained({str(tmp_path / 'model')!r})"],
        capture_output=True, text=True, timeout=180,
    )
    assert without_tfsft.returncode != 0
    assert f"model type `{MEAN_POOLED_MODEL_TYPE}`" in without_tfsft.stderr, without_tfsft.stderr[-2000:]
    assert "tfsft.modeling.load_finetuned" in (tmp_path / "model" / "README.md").read_text()

    auto = TFAutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model"))
    ours = load_finetuned(tmp_path / "model")
    assert type(auto) is type(ours) and auto.config.model_type == MEAN_POOLED_MODEL_TYPE
    inputs = {"input_ids": np.array([[101, 2023, 2003, 102, 0, 0]]), "attention_mask": np.array([[1, 1, 1, 1, 0, 0]])}
    np.testing.assert_allclose(auto(inputs).logits.numpy(), ours(inputs).logits.numpy(), atol=1e-6)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "model")).is_fast


def test_a_mean_pooled_model_saved_as_model_type_bert_still_loads(tiny_checkpoint, tmp_path):
    """Runs saved before the model type marker: config.json says "bert" with tfsft_pooling "mean"."""
    import json

    from tfsft.modeling import load_finetuned

    model = save_mean_pooled(tiny_checkpoint, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    reloaded = load_finetuned(tmp_path / "model")
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(reloaded(TOKENS).logits.numpy(), model(TOKENS).logits.numpy(), atol=1e-6)
    again, report = build_classifier(tmp_path / "model", LabelMap(("a", "b", "c")), task="ner")
    assert report.pooling == "cls" and type(again).__name__ == "TFBertForTokenClassification"


def test_a_mean_pooled_checkpoint_feeds_a_cls_or_tagging_head(tiny_checkpoint, tmp_path):
    """A tfsft mean-pooled model as the checkpoint of a new run with another head."""
    save_mean_pooled(tiny_checkpoint, tmp_path / "model")
    cls, report = build_classifier(tmp_path / "model", LabelMap(("a", "b")), pooling="cls")
    assert report.pooling == "cls" and cls.config.model_type == "bert"
    assert type(cls).__name__ == "TFBertForSequenceClassification"
    tagger, report = build_classifier(tmp_path / "model", LabelMap(("O", "B-PER", "I-PER")), task="ner")
    assert type(tagger).__name__ == "TFBertForTokenClassification" and tagger.config.model_type == "bert"


@pytest.fixture
def mixed_precision():
    import tensorflow as tf

    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    tf.keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_under_mixed_precision_the_head_computes_float32_logits_and_loss(tiny_checkpoint, mixed_precision, pooling):
    """The encoder computes in float16; the head, and so the loss, in float32 (Keras would cast the
    targets and sample weights to float16 logits' dtype and compute the loss in float16)."""
    import tensorflow as tf

    from tfsft.config import RunConfig
    from tfsft.training import compile_model

    train = RunConfig.from_flat(dict(mixed_precision=True)).train
    for task, names, y in (("classification", ("a", "b"), tf.constant([1])),
                           ("regression", ("score",), tf.constant([3.3001]))):
        model, _ = build_classifier(tiny_checkpoint, LabelMap(names), task=task, pooling=pooling)
        assert model.bert.embeddings.compute_dtype == "float16"
        compile_model(model, train, 10, task)
        logits = model(TOKENS, training=False).logits
        assert logits.dtype == tf.float32, task
        assert model.compiled_loss(y, logits).dtype == tf.float32, task


def test_float32_copy_of_a_mixed_precision_model(tiny_checkpoint, mixed_precision):
    import tensorflow as tf

    from tfsft.modeling import float32_model

    model, _ = build_classifier(tiny_checkpoint, LabelMap(("a", "b")), pooling="mean")
    copy = float32_model(model)
    assert copy is not model and type(copy) is type(model) and copy.config is model.config
    layers = [layer for layer in copy.submodules if isinstance(layer, tf.keras.layers.Layer)]
    assert layers and all(layer.compute_dtype == "float32" for layer in layers)
    assert tf.keras.mixed_precision.global_policy().name == "mixed_float16"
    weights = {w.name.split("/", 1)[1]: w.numpy() for w in model.weights}
    assert len(copy.weights) == len(weights)
    for weight in copy.weights:
        np.testing.assert_array_equal(weight.numpy(), weights[weight.name.split("/", 1)[1]])
    np.testing.assert_allclose(copy(TOKENS).logits.numpy(), model(TOKENS).logits.numpy(), atol=2e-2)
    assert float32_model(copy) is copy
