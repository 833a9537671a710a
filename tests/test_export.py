"""Export of the tiny BERT: parity of every ONNX file, fusion, int8, no bundle on failure, the
export at the end of `finetune` and `scripts/export.py`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import RUN_LABELS, make_run, run_script
from tfsft import artifacts
from tfsft.errors import ArtifactError
from tfsft.tokenize import TextEncoder

LABELS = RUN_LABELS


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint, sst2_slices):
    from tfsft.export import export_bundle

    model, run_dir, examples, labels = make_run(tmp_path_factory.mktemp("export"), tiny_checkpoint, sst2_slices["dev"])
    report = export_bundle(model, run_dir, validation_data=(examples, labels))
    return model, run_dir, examples, labels, report


def test_bundle_is_self_contained(exported):
    _, run_dir, _, _, report = exported
    bundle = run_dir / artifacts.ONNX_DIR
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8,
                 artifacts.BUNDLE_TOKENIZER, artifacts.BUNDLE_FILE, artifacts.BUNDLE_REPORT, artifacts.CONFIG_FILE):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / artifacts.BUNDLE_FILE).read_text())
    assert meta["labels"] == list(LABELS)
    assert meta["id2label"] == {"0": "0", "1": "1"}
    assert meta["max_seq_length"] == 64
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert meta["input_dtype"] == "int32"
    assert json.loads((bundle / artifacts.BUNDLE_REPORT).read_text()) == json.loads(json.dumps(report))
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_onnx_graph_interface(exported):
    import onnx

    _, run_dir, _, _, _ = exported
    model = onnx.load(str(run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_MODEL))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert [o.name for o in model.graph.output] == ["logits"]
    for graph_input in model.graph.input:
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT32
        dims = graph_input.type.tensor_type.shape.dim
        assert len(dims) == 2 and not dims[0].HasField("dim_value") and not dims[1].HasField("dim_value")
    assert not [n for n in model.graph.node if n.op_type == "Erfc"]


def test_fp32_parity_at_batch_1_and_8(exported):
    _, _, _, _, report = exported
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        for batch in ("batch_1", "batch_8"):
            result = report["parity"][name][batch]
            assert result["max_abs_logit_diff"] <= 1e-4, (name, batch, result)
            assert result["label_agreement"] == 1.0
    assert report["parity"][artifacts.BUNDLE_MODEL]["batch_8"]["examples"] == 200


def test_onnx_logits_match_keras_independently(exported):
    """Recompute parity here, with onnxruntime directly, on texts of very different lengths."""
    import onnxruntime as ort

    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.tokenize import TextEncoder

    model, run_dir, examples, _, _ = exported
    bundle = run_dir / artifacts.ONNX_DIR
    encoder = TextEncoder.from_file(bundle / artifacts.BUNDLE_TOKENIZER, 64)
    texts = ["ok", "a long, winding and " * 20 + "end", examples.texts[3], examples.texts[7]]
    data = LengthBatchedData(encoder.encode(texts), None, 8, shuffle=False, pad_id=encoder.pad_id)
    keras = predict_logits(model, data)
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
        for i, text in enumerate(texts):
            single = LengthBatchedData(encoder.encode([text]), None, 1, shuffle=False, pad_id=encoder.pad_id)
            logits = session.run(["logits"], next(iter(single)))[0]
            np.testing.assert_allclose(logits[0], keras[i], atol=1e-4)


def test_fusion_counts(exported):
    fused = exported[4]["fusion"]["fused_operators"]
    assert fused.get("Attention") == 2
    assert fused.get("SkipLayerNormalization", 0) + fused.get("LayerNormalization", 0) >= 4
    assert fused.get("BiasGelu", 0) + fused.get("Gelu", 0) == 2


def test_int8_is_smaller_and_agrees(exported):
    _, run_dir, _, _, report = exported
    bundle = run_dir / artifacts.ONNX_DIR
    int8 = report["int8"]
    assert (bundle / artifacts.BUNDLE_MODEL).stat().st_size > 3 * (bundle / artifacts.BUNDLE_MODEL_INT8).stat().st_size
    assert int8["label_agreement"] >= 0.9
    assert abs(int8["accuracy_drop"] - (report["keras_accuracy"] - int8["accuracy"])) < 1e-9


def test_int8_is_scored_in_the_runs_best_model_metric(tmp_path, tiny_checkpoint, sst2_slices):
    """A run that keeps its best epoch by F1 (MRPC) reports its int8 model's F1, not accuracy."""
    from sklearn.metrics import f1_score

    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.export import export_bundle, parity_score_name

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"],
                                                metric_for_best_model="f1")
    subset, subset_labels = examples.subset(range(64)), np.asarray(labels[:64])
    report = export_bundle(model, run_dir, validation_data=(subset, subset_labels))
    encoder = TextEncoder.from_file(run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_TOKENIZER, 64)
    data = LengthBatchedData(subset.encode(encoder, subset_labels)[0], None, 8, shuffle=False, pad_id=encoder.pad_id)
    expected = f1_score(subset_labels, predict_logits(model, data).argmax(-1))
    assert "keras_accuracy" not in report
    assert report["keras_f1"] == pytest.approx(expected, abs=1e-9)
    assert report["int8"]["f1_drop"] == pytest.approx(report["keras_f1"] - report["int8"]["f1"], abs=1e-9)
    assert report["parity"][artifacts.BUNDLE_MODEL]["batch_8"]["f1"] == pytest.approx(expected, abs=1e-9)
    assert [parity_score_name("classification", m) for m in ("f1", "mcc", "loss")] == ["f1", "mcc", "accuracy"]
    assert parity_score_name("regression", "mse") == "spearman"


def test_mean_pooled_head_exports_with_parity_and_predicts_like_keras(tmp_path, tiny_checkpoint, sst2_slices):
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.export import export_bundle
    from tfsft.inference import Predictor

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"], pooling="mean")
    report = export_bundle(model, run_dir, validation_data=(examples.subset(range(64)), labels[:64]))
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        for batch in ("batch_1", "batch_8"):
            assert report["parity"][name][batch]["max_abs_logit_diff"] <= 1e-4, (name, batch)
    assert report["fusion"]["fused_operators"].get("Attention") == 2
    predictor = Predictor(run_dir / artifacts.ONNX_DIR)
    texts = examples.texts[:16]
    data = LengthBatchedData(predictor.encoder.encode(texts), None, 16, shuffle=False, pad_id=predictor.encoder.pad_id)
    np.testing.assert_allclose(predictor.logits(texts), predict_logits(model, data), atol=1e-4)


def test_parity_failure_leaves_no_model(tmp_path, tiny_checkpoint, sst2_slices, monkeypatch):
    """A conversion that changes the function must fail loudly and publish nothing."""
    import onnx
    from onnx import numpy_helper

    from tfsft import export

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"], quantize=False)
    convert = export.convert_to_onnx

    def broken_convert(model, path, opset):
        names = convert(model, path, opset)
        graph = onnx.load(str(path))
        weights = next(i for i in graph.graph.initializer if "classifier" in i.name)
        weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * np.float32(1.01), weights.name))
        onnx.save(graph, str(path))
        return names

    monkeypatch.setattr(export, "convert_to_onnx", broken_convert)
    with pytest.raises(ArtifactError, match="parity failed"):
        export.export_bundle(model, run_dir, validation_data=(examples.subset(range(20)), labels[:20]))
    assert not (run_dir / artifacts.ONNX_DIR).exists()
    assert not list(run_dir.rglob("*.onnx"))


BUNDLE_FILES = (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8,
                artifacts.BUNDLE_TOKENIZER, artifacts.BUNDLE_FILE, artifacts.BUNDLE_REPORT, artifacts.CONFIG_FILE)


def test_finetune_with_export_writes_a_bundle_that_predicts_like_the_run(finished_tiny_run, sst2_slices):
    """`finetune(export=True)` end to end: the bundle is complete and the Predictor reproduces the
    run's own evaluation (its confusion matrix and accuracy) and the saved Keras model's logits."""
    from tfsft.data import LengthBatchedData, read_examples
    from tfsft.evaluation import predict_logits
    from tfsft.inference import Predictor
    from tfsft.modeling import feature_names, load_finetuned

    run_dir = finished_tiny_run
    bundle = run_dir / artifacts.ONNX_DIR
    for name in BUNDLE_FILES:
        assert (bundle / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    report = json.loads((bundle / artifacts.BUNDLE_REPORT).read_text())
    assert report["parity"][artifacts.BUNDLE_MODEL_FUSED]["batch_8"]["max_abs_logit_diff"] <= 1e-4

    config = artifacts.read_config(run_dir)
    examples = read_examples(str(sst2_slices["dev"]), config.data)
    predictor = Predictor(bundle)
    logits = predictor.logits(examples.texts)
    eval_report = json.loads((run_dir / artifacts.REPORT_FILE).read_text())
    labels = [eval_report["labels"].index(label) for label in examples.labels]
    matrix = np.zeros((2, 2), dtype=int)
    np.add.at(matrix, (labels, logits.argmax(-1)), 1)
    assert matrix.tolist() == eval_report["confusion_matrix"]
    metrics = json.loads((run_dir / artifacts.METRICS_FILE).read_text())
    assert (logits.argmax(-1) == labels).mean() == pytest.approx(metrics["eval_accuracy"])

    model = load_finetuned(artifacts.run_model_dir(run_dir))
    data = LengthBatchedData(predictor.encode(examples.texts), None, 32, shuffle=False,
                             pad_id=predictor.encoder.pad_id, feature_names=feature_names(model))
    np.testing.assert_allclose(logits, predict_logits(model, data), atol=1e-4)


def test_export_script_rebuilds_the_bundle_of_a_finished_run(finished_tiny_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(finished_tiny_run, run_dir)
    shutil.rmtree(run_dir / artifacts.ONNX_DIR)
    result = run_script("export.py", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in BUNDLE_FILES:
        assert (run_dir / artifacts.ONNX_DIR / name).is_file(), name
    printed = json.loads(result.stdout)
    assert printed == json.loads((run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_REPORT).read_text())
    assert printed["fusion"]["fused_operators"]["Attention"] == 2


def test_export_script_rejects_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = run_script("export.py", str(tmp_path), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], result.stderr
    assert "not a finished tfsft run" in lines[0]
    assert not (tmp_path / artifacts.ONNX_DIR).exists()


def test_multilabel_parity_score_uses_the_predictors_threshold():
    """With no threshold recorded, the int8 score is taken at the Predictor's default one, not at
    a threshold tuned on the parity examples."""
    from tfsft.config import DEFAULT_MULTILABEL_THRESHOLD
    from tfsft.export import _ParitySet

    labels = np.ones((4, 2), dtype=np.int64)
    logits = np.full((4, 2), np.log(0.3 / 0.7))
    assert DEFAULT_MULTILABEL_THRESHOLD > 0.3
    unrecorded = _ParitySet({}, {}, {8: labels}, "multilabel", None, ("a", "b"), "f1_micro")
    recorded = _ParitySet({}, {}, {8: labels}, "multilabel", {"threshold": 0.2}, ("a", "b"), "f1_micro")
    assert unrecorded.score(logits, 8) == 0.0
    assert recorded.score(logits, 8) == 1.0
