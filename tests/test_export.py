"""Export of the tiny BERT: parity of every ONNX file, fusion, int8, no bundle on failure, the
export at the end of `finetune` and `scripts/export.py`, the variants a bundle ships, weights as
external data and the per-stage memory report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import RUN_LABELS, make_run, run_script
from tfsft import artifacts
from tfsft.errors import ArtifactError
from tfsft.tokenize import TextEncoder

LABELS = RUN_LABELS


def ort_logits(path, batches) -> np.ndarray:
    """onnxruntime's logits for every batch of `batches` (features dicts), in the examples' order."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    chunks = [session.run(["logits"], features)[0] for features in batches]
    out = np.empty((sum(len(c) for c in chunks), *chunks[0].shape[1:]), dtype=np.float32)
    out[batches.order()] = np.concatenate(chunks)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint, sst2_slices):
    from tfsft.export import export_bundle

    model, run_dir, examples, labels = make_run(tmp_path_factory.mktemp("export"), tiny_checkpoint, sst2_slices["dev"],
                                                export_variants="fp32,fused,int8")
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


def test_fp32_parity_at_batch_1_and_8_sorted_and_padded(exported):
    _, _, _, _, report = exported
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        for batch in ("batch_1", "batch_8", "batch_8_padded"):
            result = report["parity"][name][batch]
            assert result["max_abs_logit_diff"] <= 1e-4, (name, batch, result)
            assert result["label_agreement"] == 1.0
    assert report["parity"][artifacts.BUNDLE_MODEL]["batch_8"]["examples"] == 200


def test_onnx_logits_match_keras_independently(exported):
    """Recompute parity here, with onnxruntime directly, on texts of very different lengths: one
    at a time, and together in one batch padded to max_seq_length (the attention mask at work)."""
    import onnxruntime as ort

    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.tokenize import TextEncoder, pad_batch

    model, run_dir, examples, _, _ = exported
    bundle = run_dir / artifacts.ONNX_DIR
    encoder = TextEncoder.from_file(bundle / artifacts.BUNDLE_TOKENIZER, 64)
    texts = ["ok", "a long, winding and " * 20 + "end", examples.texts[3], examples.texts[7]]
    data = LengthBatchedData(encoder.encode(texts), None, 8, shuffle=False, pad_id=encoder.pad_id)
    keras = predict_logits(model, data)
    padded = pad_batch(encoder.encode(texts), range(len(texts)), encoder.pad_id, multiple=64)
    assert padded["input_ids"].shape == (4, 64) and padded["attention_mask"].sum(axis=1).min() == 3
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        session = ort.InferenceSession(str(bundle / name), providers=["CPUExecutionProvider"])
        for i, text in enumerate(texts):
            single = LengthBatchedData(encoder.encode([text]), None, 1, shuffle=False, pad_id=encoder.pad_id)
            logits = session.run(["logits"], next(iter(single)))[0]
            np.testing.assert_allclose(logits[0], keras[i], atol=1e-4)
        np.testing.assert_allclose(session.run(["logits"], padded)[0], keras, atol=1e-4)


def test_fusion_counts(exported):
    import onnx

    fused = exported[4]["fusion"]["fused_operators"]
    assert fused.get("Attention") == 2
    assert fused.get("LayerNormalization", 0) >= 4
    assert fused.get("BiasGelu", 0) + fused.get("Gelu", 0) == 2
    # Each residual Add stays apart from its LayerNormalization (artifacts.ORT_DISABLED_OPTIMIZERS).
    bundle = exported[1] / artifacts.ONNX_DIR
    for name in (artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8):
        ops = [node.op_type for node in onnx.load(str(bundle / name)).graph.node]
        assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") >= 4, name


def test_int8_is_smaller_and_its_scores_are_those_of_the_int8_model(exported):
    """The report's int8 accuracy, agreement and drop, recomputed here with onnxruntime and Keras."""
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits

    model, run_dir, examples, labels, report = exported
    bundle = run_dir / artifacts.ONNX_DIR
    int8 = report["int8"]
    assert (bundle / artifacts.BUNDLE_MODEL).stat().st_size > 3 * (bundle / artifacts.BUNDLE_MODEL_INT8).stat().st_size
    encoder = TextEncoder.from_file(bundle / artifacts.BUNDLE_TOKENIZER, 64)
    # The parity batches: 8 examples sorted by length (int8 activations are quantized per batch).
    data = LengthBatchedData(encoder.encode(examples.texts), None, 8, shuffle=False, pad_id=encoder.pad_id)
    quantized = ort_logits(bundle / artifacts.BUNDLE_MODEL_INT8, data)
    keras = predict_logits(model, data)
    labels = np.asarray(labels)
    keras_accuracy = float((keras.argmax(-1) == labels).mean())
    int8_accuracy = float((quantized.argmax(-1) == labels).mean())
    assert report["keras_accuracy"] == pytest.approx(keras_accuracy, abs=1e-9)
    assert int8["accuracy"] == pytest.approx(int8_accuracy, abs=1e-9)
    assert int8["accuracy_drop"] == pytest.approx(keras_accuracy - int8_accuracy, abs=1e-9)
    decisive = np.abs(keras[:, 0] - keras[:, 1]) > 2 * report["tolerance"]
    agreement = float((quantized.argmax(-1) == keras.argmax(-1))[decisive].mean())
    assert int8["label_agreement"] == pytest.approx(agreement, abs=1e-9)
    assert int8["label_agreement"] >= 0.9


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
    int8 = ort_logits(run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_MODEL_INT8, data)
    int8_f1 = f1_score(subset_labels, int8.argmax(-1))
    assert report["int8"]["f1"] == pytest.approx(int8_f1, abs=1e-9)
    assert report["int8"]["f1_drop"] == pytest.approx(expected - int8_f1, abs=1e-9)
    assert report["parity"][artifacts.BUNDLE_MODEL_FUSED]["batch_8"]["f1"] == pytest.approx(expected, abs=1e-9)
    assert [parity_score_name("classification", m) for m in ("f1", "mcc", "loss")] == ["f1", "mcc", "accuracy"]
    assert parity_score_name("regression", "mse") == "spearman"


def test_mean_pooled_head_exports_with_parity_and_predicts_like_keras(tmp_path, tiny_checkpoint, sst2_slices):
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.export import export_bundle
    from tfsft.inference import Predictor

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"], pooling="mean",
                                                export_variants="fp32,fused,int8")
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

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"], quantize=False,
                                                export_variants="fp32,fused")
    convert = export.convert_to_onnx

    def broken_convert(model, path, opset, **kwargs):
        names = convert(model, path, opset, **kwargs)
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


BUNDLE_FILES = (artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8, artifacts.BUNDLE_TOKENIZER,
                artifacts.BUNDLE_FILE, artifacts.BUNDLE_REPORT, artifacts.CONFIG_FILE)
"""What a bundle holds by default (`--export_variants fused,int8`): no plain model.onnx."""


def test_finetune_with_export_writes_a_bundle_that_predicts_like_the_run(finished_tiny_run, sst2_slices):
    """`finetune(export=True)` end to end: the bundle is complete and the Predictor reproduces the
    run's own evaluation (its confusion matrix and accuracy) and the saved Keras model's logits."""
    from tfsft.data import LengthBatchedData, read_examples
    from tfsft.evaluation import predict_logits
    from tfsft.inference import Predictor
    from tfsft.modeling import feature_names, load_finetuned

    run_dir = finished_tiny_run
    bundle = run_dir / artifacts.ONNX_DIR
    assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE_FILES)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert json.loads((bundle / artifacts.BUNDLE_FILE).read_text())["files"] == {
        "fused": artifacts.BUNDLE_MODEL_FUSED, "int8": artifacts.BUNDLE_MODEL_INT8}
    report = json.loads((bundle / artifacts.BUNDLE_REPORT).read_text())
    assert set(report["parity"]) == {artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8}
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
    config = json.loads((run_dir / artifacts.CONFIG_FILE).read_text())
    config["data"]["train_file"] = str(tmp_path / "deleted.tsv")  # export never reads the training file
    (run_dir / artifacts.CONFIG_FILE).write_text(json.dumps(config))
    result = run_script("export.py", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / artifacts.ONNX_DIR).iterdir()) == sorted(BUNDLE_FILES)
    printed = json.loads(result.stdout)
    assert printed == json.loads((run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_REPORT).read_text())
    assert printed["fusion"]["fused_operators"]["Attention"] == 2
    assert "load_model" in printed["stages"], "the export of a run measures loading its model too"
    assert "shape inference" not in result.stderr  # the optimizer's warnings about what export turned off


def test_export_script_rejects_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    result = run_script("export.py", str(tmp_path), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path) in lines[0], result.stderr
    assert "not a finished tfsft run" in lines[0]
    assert not (tmp_path / artifacts.ONNX_DIR).exists()


EXPORT_STAGES = {
    "keras_logits", "convert", "convert/freeze", "convert/tf2onnx", "convert/optimize", "convert/save",
    "optimize", "optimize/canonicalize", "optimize/fuse", "optimize/save", "quantize",
    "inline/model.onnx", "inline/model.fused.onnx",
    "parity/model.onnx", "parity/model.fused.onnx", "parity/model.int8.onnx",
}
"""Every stage of an export of all three variants (`export_run` adds load_model before them)."""


def test_the_report_names_every_stage_with_its_peak_rss_and_seconds(exported):
    report = exported[4]
    stages = report["stages"]
    assert set(stages) == EXPORT_STAGES
    for name, stage in stages.items():
        assert stage["seconds"] >= 0 and stage["started_s"] >= 0, name
        assert stage["peak_rss_mb"] >= max(stage["rss_before_mb"], stage["rss_after_mb"]) > 0, name
    assert stages["convert"]["seconds"] > 0 and stages["keras_logits"]["seconds"] > 0
    order = sorted(stages, key=lambda name: stages[name]["started_s"])
    assert order[0] == "keras_logits" and order[-1] == "parity/model.int8.onnx"
    assert order.index("quantize") < order.index("parity/model.fused.onnx")
    for name in EXPORT_STAGES:  # a sub-stage runs inside its stage, and peaks no higher
        outer = stages[name.split("/")[0]] if "/" in name and name.split("/")[0] in stages else None
        if outer is not None:
            inner = stages[name]
            assert outer["started_s"] <= inner["started_s"]
            assert inner["started_s"] + inner["seconds"] <= outer["started_s"] + outer["seconds"] + 5e-3  # rounding
            assert inner["peak_rss_mb"] <= outer["peak_rss_mb"]
    assert report["peak_rss_mb"] == max(stage["peak_rss_mb"] for stage in stages.values())


def test_the_lean_conversion_gives_the_graph_tf2onnx_gives(tmp_path, tiny_checkpoint, sst2_slices):
    """The weights that leave the frozen graph early, and tf2onnx's optimizers run without their
    copies, change nothing in the graph: node for node and logit for logit, it is the graph
    of tf2onnx's own `convert.from_function`. (Weights are made non-zero first: grappler folds
    `x + 0` where it sees a zero bias, as in a freshly initialised model, and the lean path,
    which hides the weights from grappler, keeps that Add.)"""
    from collections import Counter

    import onnx
    import onnxruntime as ort
    import tf2onnx
    from onnx import numpy_helper

    from tfsft.export import convert_to_onnx
    from tfsft.modeling import tf
    from tfsft.tokenize import pad_batch

    model, run_dir, examples, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(weight.numpy() + rng.normal(0, 0.01, weight.shape).astype(np.float32))
    names = convert_to_onnx(model, tmp_path / "lean.onnx", 17)
    signature = [tf.TensorSpec([None, None], tf.int32, name=name) for name in names]

    @tf.function(input_signature=signature)
    def forward(*inputs):
        return {"logits": model(dict(zip(names, inputs)), training=False).logits}

    tf2onnx.convert.from_function(forward, input_signature=signature, opset=17, output_path=str(tmp_path / "stock.onnx"))
    lean, stock = (onnx.load(str(tmp_path / name)) for name in ("lean.onnx", "stock.onnx"))
    assert Counter(n.op_type for n in lean.graph.node) == Counter(n.op_type for n in stock.graph.node)
    values = [sorted((tuple(i.dims), numpy_helper.to_array(i).tobytes()) for i in m.graph.initializer) for m in (lean, stock)]
    assert values[0] == values[1]
    encoder = TextEncoder.from_file(run_dir / artifacts.MODEL_DIR / artifacts.BUNDLE_TOKENIZER, 64)
    batch = pad_batch(encoder.encode(examples.texts[:8]), range(8), encoder.pad_id, multiple=64)
    feed = {name: batch[name] for name in names}
    outputs = [ort.InferenceSession(str(tmp_path / name)).run(None, feed)[0] for name in ("lean.onnx", "stock.onnx")]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6)


def test_skipping_the_quantizers_second_shape_inference_changes_nothing(exported, tmp_path):
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from tfsft.export import quantize_int8

    source = exported[1] / artifacts.ONNX_DIR / artifacts.BUNDLE_MODEL_FUSED
    quantize_int8(source, tmp_path / "lean.onnx")
    quantize_dynamic(str(source), str(tmp_path / "stock.onnx"), weight_type=QuantType.QInt8, per_channel=True,
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    assert (tmp_path / "lean.onnx").read_bytes() == (tmp_path / "stock.onnx").read_bytes()


def quantized_weight_columns(path: Path) -> dict[str, tuple[str, int, int]]:
    """{node: (op type, weight columns, weight zero points)} for the int8 graph's MatMulInteger and
    QAttention nodes: one zero point per column is a per-channel weight, one in all a per-tensor one."""
    import onnx

    model = onnx.load(str(path))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    zero_point_input = {"MatMulInteger": 3, "QAttention": 7}
    found = {}
    for node in model.graph.node:
        if node.op_type in zero_point_input:
            weight, zero_point = initializers[node.input[1]], initializers[node.input[zero_point_input[node.op_type]]]
            found[node.name] = (node.op_type, int(weight.dims[-1]), int(np.prod(zero_point.dims)))
    return found


def test_int8_weights_have_a_scale_per_output_column(exported):
    """Every quantized MatMul and Attention of the int8 model, the classifier head included, is
    quantized per output column, and the report says so."""
    import onnx

    bundle = exported[1] / artifacts.ONNX_DIR
    fused = [node.op_type for node in onnx.load(str(bundle / artifacts.BUNDLE_MODEL_FUSED)).graph.node]
    columns = quantized_weight_columns(bundle / artifacts.BUNDLE_MODEL_INT8)
    kinds = [kind for kind, _, _ in columns.values()]
    assert kinds.count("MatMulInteger") == fused.count("MatMul")
    assert kinds.count("QAttention") == fused.count("Attention")
    assert {name: width for name, (_, width, _) in columns.items()} == {
        name: points for name, (_, _, points) in columns.items()}
    assert exported[4]["int8"]["weight_scales"] == "per_channel"


def test_a_model_that_nothing_fuses_ships_plain_and_is_quantized_from_it(tmp_path, tiny_checkpoint, sst2_slices,
                                                                        monkeypatch):
    """Default variants (fused, int8) where onnxruntime's optimizer fuses nothing: model.onnx is
    the fp32 model shipped, int8 is quantized from it, and no model.fused.onnx is left."""
    import shutil

    from tfsft import export

    def fuses_nothing(source, target, *args, **kwargs):
        shutil.copy(source, target)
        shutil.copy(export.external_data_path(source), export.external_data_path(target))
        return {"rewrites": {}, "fused_operators": {}}

    monkeypatch.setattr(export, "optimize", fuses_nothing)
    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    report = export.export_bundle(model, run_dir, validation_data=(examples.subset(range(40)), labels[:40]))
    bundle = run_dir / artifacts.ONNX_DIR
    assert json.loads((bundle / artifacts.BUNDLE_FILE).read_text())["files"] == {
        "model": artifacts.BUNDLE_MODEL, "int8": artifacts.BUNDLE_MODEL_INT8}
    assert not list(bundle.glob("model.fused*")) and not list(bundle.glob("*.data"))
    assert report["fusion"]["applied"] is False and report["int8"]["quantized_from"] == artifacts.BUNDLE_MODEL
    assert report["parity"][artifacts.BUNDLE_MODEL]["batch_8"]["max_abs_logit_diff"] <= 1e-4


def test_weights_stored_as_external_data_load_and_pass_parity(tmp_path, tiny_checkpoint, sst2_slices):
    """--external_data always (what `auto` does past 1 GiB of weights, and protobuf's 2 GiB limit
    needs): every model keeps its weights in FILE.data; the bundle, moved elsewhere, still
    loads, and its fp32 models give Keras's logits."""
    import shutil

    import onnx
    from onnx.external_data_helper import uses_external_data

    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.export import export_bundle
    from tfsft.inference import Predictor

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"],
                                                export_variants="fp32,fused,int8", external_data="always")
    report = export_bundle(model, run_dir, validation_data=(examples.subset(range(48)), labels[:48]))
    assert report["external_data"] is True
    moved = tmp_path / "elsewhere"
    shutil.move(str(run_dir / artifacts.ONNX_DIR), str(moved))
    meta = json.loads((moved / artifacts.BUNDLE_FILE).read_text())
    assert meta["external_data"] == {name: f"{name}.data" for name in meta["files"].values()}
    for name in meta["files"].values():
        graph = onnx.load(str(moved / name), load_external_data=False)
        assert any(uses_external_data(init) for init in graph.graph.initializer), name
        assert (moved / f"{name}.data").stat().st_size > 5 * (moved / name).stat().st_size, name
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        for batch in ("batch_1", "batch_8", "batch_8_padded"):
            assert report["parity"][name][batch]["max_abs_logit_diff"] <= 1e-4, (name, batch)
    texts = examples.texts[:16]
    for fused in (True, False):
        predictor = Predictor(moved, fused=fused)
        assert predictor.model_path.name == (artifacts.BUNDLE_MODEL_FUSED if fused else artifacts.BUNDLE_MODEL)
        data = LengthBatchedData(predictor.encode(texts), None, 16, shuffle=False, pad_id=predictor.encoder.pad_id)
        np.testing.assert_allclose(predictor.logits(texts), predict_logits(model, data), atol=1e-4)
    assert len(Predictor(moved, int8=True).predict(texts)) == 16


def test_external_data_is_chosen_by_size_and_required_past_protobufs_limit():
    from tfsft.export import PROTOBUF_LIMIT_BYTES, wants_external_data

    assert not wants_external_data("auto", 90 * 2**20) and wants_external_data("always", 90 * 2**20)
    assert wants_external_data("auto", PROTOBUF_LIMIT_BYTES + 1) and not wants_external_data("never", 90 * 2**20)
    with pytest.raises(ArtifactError, match="exceed protobuf's 2 GiB limit.*Received: external_data=never"):
        wants_external_data("never", PROTOBUF_LIMIT_BYTES + 1)


def test_a_model_written_in_pieces_is_the_model(tmp_path):
    """The ONNX writer that streams initializers one at a time writes a file that parses back
    to the same model."""
    import onnx
    from onnx import helper, numpy_helper

    from tfsft.export import save_onnx

    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"]) for i in range(3)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("h3", onnx.TensorProto.FLOAT, [1, 64])], weights)
    model = helper.make_model(graph, producer_name="test")
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    save_onnx(model, tmp_path / "m.onnx")
    written = onnx.load(str(tmp_path / "m.onnx"))
    assert written == expected
    assert not len(model.graph.initializer), "the writer gives the weights up as it writes them"


def test_export_script_refuses_an_unknown_variant_before_tensorflow(finished_tiny_run, tmp_path):
    from conftest import env_without_tensorflow

    result = run_script("export.py", str(finished_tiny_run), "--export_variants", "fused,fp16", timeout=120,
                        env=env_without_tensorflow(tmp_path / "no-tf"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Invalid value for --export_variants" in lines[0], result.stderr
    assert "Received: export_variants='fused,fp16'" in lines[0]


def test_multilabel_parity_score_uses_the_predictors_threshold():
    """With no threshold recorded, the int8 score is taken at the Predictor's default one, not at
    a threshold tuned on the parity examples."""
    from tfsft.config import DEFAULT_MULTILABEL_THRESHOLD
    from tfsft.export import _ParitySet

    labels = np.ones((4, 2), dtype=np.int64)
    logits = np.full((4, 2), np.log(0.3 / 0.7))
    assert DEFAULT_MULTILABEL_THRESHOLD > 0.3
    unrecorded = _ParitySet({}, {}, {"batch_8": labels}, "multilabel", None, ("a", "b"), "f1_micro")
    recorded = _ParitySet({}, {}, {"batch_8": labels}, "multilabel", {"threshold": 0.2}, ("a", "b"), "f1_micro")
    assert unrecorded.score(logits, "batch_8") == 0.0
    assert recorded.score(logits, "batch_8") == 1.0


# ---------------------------------------------------------------- parity on padded batches


def test_label_agreement_counts_what_keras_decides_by_more_than_the_tolerance():
    """A near-tie that flips within the logit tolerance is no disagreement; a decided label that
    flips is. Multilabel compares the label sets at the decision threshold, NER the tags of the
    scored tokens, regression has no labels to agree on."""
    from tfsft.data import IGNORED_LABEL
    from tfsft.export import label_agreement

    tolerance = 1e-4
    keras = np.array([[1.0, 0.0], [0.5, 0.50015], [0.0, 2.0]], dtype=np.float32)
    onnx = keras + np.array([[0, 0], [8e-5, -8e-5], [0, 0]], dtype=np.float32)
    assert onnx[1].argmax() != keras[1].argmax()
    assert label_agreement("classification", onnx, keras, tolerance) == (1.0, 2)
    onnx[2] = [2.0, 0.0]
    assert label_agreement("classification", onnx, keras, tolerance) == (0.5, 2)
    assert label_agreement("regression", keras[:, :1] + 1.0, keras[:, :1], tolerance) == (None, 0)

    keras = np.array([[2.0, -2.0], [0.00005, 1.0], [1.0, 1.0]], dtype=np.float32)
    onnx = np.array([[2.0, -2.0], [-0.00005, 1.0], [1.0, -1.0]], dtype=np.float32)
    assert label_agreement("multilabel", onnx, keras, tolerance, threshold=0.5) == (0.5, 2)
    # At 0.8 (logit 1.386) every Keras set is decided: row 2 holds no label either way.
    assert label_agreement("multilabel", onnx, keras, tolerance, threshold=0.8) == (1.0, 3)

    keras = np.array([[[0.0, 5.0], [5.0, 0.0], [0.0, 5.0], [0.0, 0.0]]], dtype=np.float32)
    onnx = keras.copy()
    onnx[0, 0] = [5.0, 0.0]  # [CLS]: not scored
    onnx[0, 3] = [5.0, 0.0]  # padding: not scored
    labels = np.empty(1, dtype=object)
    labels[0] = np.array([IGNORED_LABEL, 0, 1], dtype=np.int32)
    assert label_agreement("ner", onnx, keras, tolerance, token_labels=labels) == (1.0, 2)
    onnx[0, 2] = [5.0, 0.0]
    assert label_agreement("ner", onnx, keras, tolerance, token_labels=labels) == (0.5, 2)


EQUAL_LENGTH_WORDS = (("good", "bad", "fine", "great", "poor", "dull", "funny", "sad"),
                      ("movie", "film", "story", "plot", "cast", "show"), ("works", "fails", "ends", "starts"))


def equal_length_examples(tmp_path: Path, count: int) -> Path:
    """A TSV of `count` sentences that all tokenize to the same length (so length-sorted batches
    of them carry no padding at all), with alternating labels 0/1."""
    import itertools

    texts = [f"the {a} {n} {v}" for a, n, v in itertools.product(*EQUAL_LENGTH_WORDS)]
    chosen = [texts[i] for i in np.random.default_rng(0).permutation(len(texts))[:count]]
    rows = [f"{text}\t{i % 2}" for i, text in enumerate(chosen)]
    path = tmp_path / "equal.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def ignore_attention_mask(path: Path) -> None:
    """Rewrite an ONNX graph so that every reader of the attention mask reads max(mask, 1): ones."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    mask = next(i.name for i in model.graph.input if "attention_mask" in i.name)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name == mask:
                node.input[k] = "broken/ones"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int32), "broken/one"))
    model.graph.node.insert(0, helper.make_node("Max", [mask, "broken/one"], ["broken/ones"]))
    onnx.save(model, str(path))


def test_a_graph_that_ignores_the_attention_mask_fails_the_padded_parity_check(tmp_path, tiny_checkpoint, monkeypatch):
    """Examples of one length make every sorted batch (and batch size 1) padding-free, so only the
    shuffled batches padded to max_seq_length can see that the mask is ignored."""
    from tfsft import export

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, equal_length_examples(tmp_path, 48),
                                                quantize=False, export_variants="fp32,fused")
    encoder = TextEncoder.from_file(run_dir / artifacts.MODEL_DIR / artifacts.BUNDLE_TOKENIZER, 64)
    assert len(set(encoder.encode(examples.texts).lengths.tolist())) == 1
    convert = export.convert_to_onnx

    def convert_ignoring_the_mask(model, path, opset, **kwargs):
        names = convert(model, path, opset, **kwargs)
        ignore_attention_mask(path)
        return names

    monkeypatch.setattr(export, "convert_to_onnx", convert_ignoring_the_mask)
    with pytest.raises(ArtifactError, match=r"parity failed on batch_8_padded"):
        export.export_bundle(model, run_dir, validation_data=(examples, labels))
    assert not (run_dir / artifacts.ONNX_DIR).exists()


def test_padded_parity_batches_mix_lengths_and_pad_to_max_seq_length(tiny_checkpoint, sst2_slices):
    from tfsft.config import DataConfig
    from tfsft.data import read_examples
    from tfsft.export import PaddedBatches

    examples = read_examples(str(sst2_slices["dev"]), DataConfig())
    encoder = TextEncoder.from_file(tiny_checkpoint / artifacts.BUNDLE_TOKENIZER, 64)
    encoded = encoder.encode(examples.texts)
    batches = PaddedBatches(encoded, 8, 64, encoder.pad_id, ("input_ids", "attention_mask", "token_type_ids"))
    assert sorted(batches.order().tolist()) == list(range(len(examples)))
    widths, padding = [], []
    for features, indices in zip(batches, batches.batches()):
        widths.append(features["input_ids"].shape[1])
        padding.append(1 - features["attention_mask"].mean())
        np.testing.assert_array_equal(features["attention_mask"].sum(axis=1), encoded.lengths[indices])
    assert widths[::2] == [64] * len(widths[::2]) and min(widths[1::2]) < 64
    assert np.mean(padding) > 0.4, "much of these batches is padding"


# ------------------------------------------------------------------- mixed precision


@pytest.fixture
def restore_float32_policy():
    yield
    from tfsft.modeling import tf

    tf.keras.mixed_precision.set_global_policy("float32")


def test_a_mixed_precision_run_exports_a_float32_graph_with_parity(
    tmp_path, tiny_checkpoint, sst2_slices, restore_float32_policy
):
    import onnx

    from tfsft import RunConfig, finetune

    result = finetune(RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), max_train_samples=32, max_eval_samples=48, max_seq_length=64,
        mixed_precision=True, export=True, export_variants="fp32,fused", output_dir=str(tmp_path / "run"),
    )), verbose=0)
    bundle = result.run_dir / artifacts.ONNX_DIR
    report = json.loads((bundle / artifacts.BUNDLE_REPORT).read_text())
    for name in (artifacts.BUNDLE_MODEL, artifacts.BUNDLE_MODEL_FUSED):
        graph = onnx.load(str(bundle / name)).graph
        assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.INT32}
        assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]
        assert onnx.TensorProto.FLOAT16 not in {init.data_type for init in graph.initializer}, name
        casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
        assert onnx.TensorProto.FLOAT16 not in casts, name
        for batch in ("batch_1", "batch_8", "batch_8_padded"):
            assert report["parity"][name][batch]["max_abs_logit_diff"] <= 1e-4, (name, batch)


# ------------------------------------------------------- what export reads of the data


def test_a_finished_run_records_the_validation_examples_it_evaluated(finished_tiny_run, sst2_slices):
    from tfsft.data import read_examples
    from tfsft.export import recorded_validation

    config = artifacts.read_config(finished_tiny_run)
    recorded = recorded_validation(finished_tiny_run)
    dev = read_examples(str(sst2_slices["dev"]), config.data)
    assert (recorded.texts, recorded.labels, recorded.rows) == (dev.texts, dev.labels, dev.rows)
    metrics = json.loads((finished_tiny_run / artifacts.METRICS_FILE).read_text())
    assert metrics["eval_samples"] == len(recorded)


def exported_examples(run_dir: Path, monkeypatch) -> list:
    """The validation examples `export_run` hands to the export (which is not run)."""
    from tfsft import export

    seen = []
    monkeypatch.setattr(export, "export_bundle", lambda model, run, validation_data, **kwargs: seen.append(validation_data))
    export.export_run(run_dir)
    return seen


def test_export_of_a_held_out_run_reads_neither_data_file(tmp_path, tiny_checkpoint, sst2_slices, monkeypatch):
    """Without --validation_file the hold-out came from the training file: the run recorded it,
    and export reads the record, not the corpus (deleted here)."""
    from tfsft.data import load_splits
    from tfsft.export import record_validation

    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    train = tmp_path / "train.tsv"
    train.write_bytes(sst2_slices["train"].read_bytes())
    config = artifacts.read_config(run_dir).replace(train_file=str(train), validation_file=None, max_eval_samples=30)
    artifacts.save_config(config, run_dir)
    held_out = load_splits(config.data, config.train.seed).validation
    record_validation(run_dir, held_out)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, {"eval_samples": len(held_out)})
    train.unlink()
    [(examples, labels)] = exported_examples(run_dir, monkeypatch)
    assert (examples.texts, examples.labels, examples.rows) == (held_out.texts, held_out.labels, held_out.rows)
    assert len(examples) == 30 and labels.tolist() == [int(label) for label in held_out.labels]


def test_export_of_a_run_without_a_record_reads_its_validation_file_only(tmp_path, tiny_checkpoint, sst2_slices,
                                                                         monkeypatch):
    """Runs exported before validation examples were recorded: the validation file, sampled as
    training sampled it, and never the training file (a missing path here)."""
    from tfsft.data import read_examples, sample

    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    config = artifacts.read_config(run_dir).replace(train_file=str(tmp_path / "deleted.tsv"), max_eval_samples=25)
    artifacts.save_config(config, run_dir)
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, {"eval_samples": 25})
    [(examples, _)] = exported_examples(run_dir, monkeypatch)
    expected = sample(read_examples(str(sst2_slices["dev"]), config.data), 25, config.train.seed)
    assert (examples.texts, examples.rows) == (expected.texts, expected.rows)


def test_a_corrupt_validation_record_is_named(tmp_path, tiny_checkpoint, sst2_slices, monkeypatch):
    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, {})
    (run_dir / artifacts.VALIDATION_EXAMPLES).write_text('{"texts": ["a"]')
    with pytest.raises(ArtifactError, match=artifacts.VALIDATION_EXAMPLES):
        exported_examples(run_dir, monkeypatch)


def test_inference_bench_reads_the_int8_drop_the_report_records(exported, tmp_path):
    """bench/inference.py end to end on the tiny three-model bundle (no timing asserted): every
    shape's row, the int8 drop under the report's own key, and the Predictor on a small file."""
    import subprocess
    import sys

    from conftest import ROOT

    _, run_dir, examples, _, report = exported
    eval_file = tmp_path / "dev.tsv"
    eval_file.write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in examples.texts[:40]), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inference.py"), str(run_dir), "--repeats", "3",
         "--eval_file", str(eval_file)], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| batch ")]
    assert len(rows) == 5 and all(row.count(" ms |") + row.count(" ex/s |") == 4 for row in rows)
    drop = report["int8"]["accuracy_drop"] * 100
    assert f"int8 accuracy drop: {drop:.2f} points" in result.stdout
    assert "| length-sorted, per-batch padding |" in result.stdout
