"""Predictor and scripts/predict.py over a tiny exported bundle: order, parity, errors, TF-free."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, make_run, run_script
from tfsft import artifacts
from tfsft.errors import ArtifactError


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint, sst2_slices):
    """(Keras model, bundle dir, dev examples) from an export of the tiny classifier."""

    from tfsft.export import export_bundle

    model, run_dir, examples, labels = make_run(tmp_path_factory.mktemp("inference"), tiny_checkpoint, sst2_slices["dev"])
    export_bundle(model, run_dir, validation_data=(examples.subset(range(40)), labels[:40]))
    return model, run_dir / artifacts.ONNX_DIR, examples


def keras_logits(model, bundle_dir: Path, texts, pairs=None) -> np.ndarray:
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.tokenize import TextEncoder

    encoder = TextEncoder.from_file(bundle_dir / artifacts.BUNDLE_TOKENIZER, 64)
    data = LengthBatchedData(encoder.encode(texts, pairs), None, 4, shuffle=False, pad_id=encoder.pad_id)
    return predict_logits(model, data)


def test_predictions_match_keras_in_input_order(bundle):
    from tfsft.inference import Predictor, softmax

    model, bundle_dir, examples = bundle
    texts = examples.texts[:37]
    predictor = Predictor(bundle_dir, batch_size=8)
    predictions = predictor.predict(texts)
    reference = softmax(keras_logits(model, bundle_dir, texts))
    assert [p.label for p in predictions] == [predictor.labels[i] for i in reference.argmax(-1)]
    probabilities = np.array([[p.probabilities[label] for label in predictor.labels] for p in predictions])
    np.testing.assert_allclose(probabilities, reference, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-6)
    singles = [predictor.predict_one(text) for text in texts[:5]]
    for single, batched in zip(singles, predictions):
        assert single.label == batched.label
        assert single.probabilities == pytest.approx(batched.probabilities, abs=1e-5)


def test_pairs_and_int8(bundle):
    from tfsft.inference import Predictor, softmax

    model, bundle_dir, examples = bundle
    texts, pairs = examples.texts[:6], examples.texts[6:12]
    fp32 = Predictor(bundle_dir).predict(list(zip(texts, pairs)))
    reference = softmax(keras_logits(model, bundle_dir, texts, pairs))
    got = np.array([[p.probabilities[label] for label in ("0", "1")] for p in fp32])
    np.testing.assert_allclose(got, reference, atol=1e-5)
    int8 = Predictor(bundle_dir, int8=True)
    assert int8.model_path.name == artifacts.BUNDLE_MODEL_INT8
    assert len(int8.predict(texts)) == 6
    with pytest.raises(ValueError, match="mix"):
        int8.predict(["a", ("b", "c")])


def test_thread_safety(bundle):
    from concurrent.futures import ThreadPoolExecutor

    from tfsft.inference import Predictor

    _, bundle_dir, examples = bundle
    predictor = Predictor(bundle_dir, batch_size=4)
    chunks = [examples.texts[i : i + 10] for i in range(0, 80, 10)]
    expected = [predictor.predict(chunk) for chunk in chunks]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(predictor.predict, chunks))
    assert [[p.label for p in c] for c in got] == [[p.label for p in c] for c in expected]


def test_corrupt_onnx_file_is_named(bundle, tmp_path):
    from tfsft.inference import Predictor

    broken = tmp_path / "bundle"
    shutil.copytree(bundle[1], broken)
    model_file = broken / artifacts.BUNDLE_MODEL_FUSED
    model_file.write_bytes(model_file.read_bytes()[:5000])
    with pytest.raises(ArtifactError, match=str(model_file)):
        Predictor(broken)


def test_label_map_mismatch_is_named(bundle, tmp_path):
    from tfsft.inference import Predictor

    broken = tmp_path / "bundle"
    shutil.copytree(bundle[1], broken)
    meta_file = broken / artifacts.BUNDLE_FILE
    meta = json.loads(meta_file.read_text())
    meta["labels"] = ["a", "b", "c"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="outputs 2 logits.*3 labels"):
        Predictor(broken)


def residual_layer_norm_model(path: Path) -> Path:
    """y = LayerNormalization(x + skip): the form onnxruntime fuses into SkipLayerNormalization."""
    import onnx
    from onnx import TensorProto, helper

    shape, hidden = [2, 3, 8], 8
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")]
    weights = [helper.make_tensor(n, TensorProto.FLOAT, [hidden], np.full(hidden, v, np.float32))
               for n, v in (("gamma", 1.5), ("beta", 0.25))]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-6)]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    graph = helper.make_graph(nodes, "g", inputs, [output], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_sessions_keep_each_residual_add_apart_from_its_layer_norm(tmp_path, monkeypatch):
    """onnxruntime's CPU SkipLayerNormalization is slower than the Add and LayerNormalization it
    fuses (bench/layer_norm.py): the disabled rewrite must be the one that fuses them, and every
    session tfsft opens on a bundle's model must pass it."""
    import onnx
    import onnxruntime as ort

    from tfsft import export, inference

    model = residual_layer_norm_model(tmp_path / "residual.onnx")

    def optimized_ops(disabled: list[str]) -> list[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]

    assert "SkipLayerNormalization" in optimized_ops([])
    assert optimized_ops(list(artifacts.ORT_DISABLED_OPTIMIZERS)) == ["Add", "LayerNormalization"]

    opened = []
    session_class = ort.InferenceSession

    def recording_session(*args, **kwargs):
        opened.append(kwargs.get("disabled_optimizers"))
        return session_class(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    export._session(model)  # the parity checks' session
    session = inference.open_session(model, None)
    assert opened == [list(artifacts.ORT_DISABLED_OPTIMIZERS)] * 2
    x, skip = np.arange(48, dtype=np.float32).reshape(2, 3, 8) / 7, np.ones((2, 3, 8), np.float32)
    total = x + skip
    expected = (total - total.mean(-1, keepdims=True)) / np.sqrt(total.var(-1, keepdims=True) + 1e-6) * 1.5 + 0.25
    np.testing.assert_allclose(session.run(None, {"x": x, "skip": skip})[0], expected, atol=1e-5)


def test_layer_norm_bench_times_both_forms_on_a_bundle(bundle, tmp_path):
    """bench/layer_norm.py end to end on the tiny bundle (no timing asserted): both parts' rows,
    the bundle's files free of the fused op, and the two sessions giving the same logits."""
    _, bundle_dir, _ = bundle
    output = tmp_path / "layer_norm.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "layer_norm.py"), "--bundle", str(bundle_dir), "--repeats", "1",
         "--output", str(output)], capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = output.read_text()
    rows = [line.split(" | ") for line in report.splitlines() if line.startswith(f"| {artifacts.BUNDLE_MODEL_FUSED} |")]
    assert len(rows) == 2 and all(row[1].startswith("0 / ") and row[1] != "0 / 0" for row in rows)
    assert all(float(row[-1].rstrip(" |")) < 1e-4 for row in rows)
    assert report.count("| LayerNorm |") == report.count("| RMS |") == 4


def test_import_is_tensorflow_free():
    code = (
        "import sys, tfsft.tasks, tfsft.inference, tfsft.serving; "
        "heavy = [m for m in ('tensorflow', 'transformers', 'tf_keras') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_predict_script_jsonl_and_csv(bundle, tmp_path):
    from tfsft.inference import Predictor

    _, bundle_dir, examples = bundle
    texts = examples.texts[:9]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    expected = Predictor(bundle_dir).predict(texts)

    result = run_script("predict.py", str(bundle_dir), "--input", str(source), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert rows[0]["probabilities"] == pytest.approx(expected[0].probabilities, abs=1e-6)

    output = tmp_path / "out.csv"
    result = run_script("predict.py", str(bundle_dir), "--input", str(source), "--output_format", "csv",
                        "--output", str(output), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = output.read_text().splitlines()
    assert lines[0] == "label,p_0,p_1"
    assert [line.split(",")[0] for line in lines[1:]] == [p.label for p in expected]


def test_predict_script_reads_tsv_from_stdin(bundle):
    import subprocess

    _, bundle_dir, examples = bundle
    tsv = "sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in examples.texts[:3])
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "predict.py"), str(bundle_dir), "--input", "-", "--input_format", "tsv"],
        input=tsv, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3


def test_predict_script_reports_malformed_line(bundle, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": oops}\n')
    result = run_script("predict.py", str(bundle[1]), "--input", str(source), timeout=120)
    assert result.returncode != 0
    assert "line 4" in result.stderr and "Traceback" not in result.stderr


def test_a_bundle_of_int8_alone_serves_and_passes_parity(tmp_path, tiny_checkpoint, sst2_slices):
    """`tfsft export RUN_DIR --export_variants int8`: the bundle ships model.int8.onnx and no fp32
    model; the fp32 model it was quantized from passed parity before it was dropped; the
    Predictor, the server's precision choice and `tfsft predict` serve int8, close to Keras."""
    from tfsft.export import record_validation
    from tfsft.inference import Bundle, Predictor, choose_precision

    model, run_dir, examples, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    record_validation(run_dir, examples.subset(range(48)))
    artifacts.write_json(run_dir / artifacts.METRICS_FILE, {"eval_samples": 48})
    result = run_script("export.py", str(run_dir), "--export_variants", "int8", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle_dir = run_dir / artifacts.ONNX_DIR
    assert sorted(p.name for p in bundle_dir.glob("*.onnx*")) == [artifacts.BUNDLE_MODEL_INT8]
    assert json.loads((bundle_dir / artifacts.BUNDLE_FILE).read_text())["files"] == {"int8": artifacts.BUNDLE_MODEL_INT8}
    assert json.loads((bundle_dir / artifacts.CONFIG_FILE).read_text())["export"]["export_variants"] == "int8"
    report = json.loads(result.stdout)
    assert report["variants"] == ["int8"] and set(report["parity"]) == {artifacts.BUNDLE_MODEL_INT8}
    assert report["int8"]["quantized_from"] == artifacts.BUNDLE_MODEL_FUSED
    for batch, checked in report["int8"]["source_parity"].items():
        assert checked["max_abs_logit_diff"] <= 1e-4 and checked["label_agreement"] == 1.0, batch
    assert report["parity"][artifacts.BUNDLE_MODEL_INT8]["batch_8"]["label_agreement"] >= 0.9

    bundle = Bundle.load(bundle_dir)
    choice = choose_precision(bundle, "auto")
    assert choice.int8 and choice.reason == "the bundle ships only the int8 model"
    with pytest.raises(ArtifactError, match="--precision fp32, but the bundle has no fp32 model"):
        choose_precision(bundle, "fp32")
    with pytest.raises(ArtifactError, match=r"no fp32 model .*--export_variants fused"):
        Predictor(bundle_dir, int8=False)
    predictor = Predictor(bundle_dir)
    assert predictor.model_path.name == artifacts.BUNDLE_MODEL_INT8
    texts = examples.texts[:32]
    got, keras = predictor.logits(texts), keras_logits(model, bundle_dir, texts)
    decided = np.abs(keras[:, 0] - keras[:, 1]) > 0.05
    assert decided.sum() > 10 and (got.argmax(-1) == keras.argmax(-1))[decided].mean() >= 0.9
    assert np.abs(got - keras).max() < 0.05

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:5]))
    served = run_script("predict.py", str(bundle_dir), "--input", str(source), timeout=120)
    assert served.returncode == 0, served.stderr
    assert [json.loads(line)["label"] for line in served.stdout.splitlines()] == [
        p.label for p in predictor.predict(texts[:5])]


def test_a_missing_model_is_named_with_what_the_bundle_ships(bundle, tmp_path):
    """The default bundle ships the fused fp32 and the int8 model: asking for the plain one says so."""
    from tfsft.inference import Predictor

    _, bundle_dir, _ = bundle
    with pytest.raises(ArtifactError, match=r"no plain \(unfused\) fp32 model \(it ships model.fused.onnx, "
                                            r"model.int8.onnx\); re-export .*--export_variants fp32"):
        Predictor(bundle_dir, fused=False)


# ------------------------------------------------------------------------------- tagging bundles

NER_LABELS = ("B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER", "O")


@pytest.fixture(scope="module")
def ner_bundle(tmp_path_factory, tiny_checkpoint) -> Path:
    """An exported (untrained) tiny token classifier with the CoNLL tags and max_seq_length 32."""
    from conftest import shared_path
    from tfsft.config import RunConfig
    from tfsft.data import LabelMap, encode_labels
    from tfsft.tasks.ner import read_token_examples
    from tfsft.export import export_bundle
    from tfsft.modeling import build_classifier, load_tokenizer, save_pretrained

    directory = tmp_path_factory.mktemp("ner-bundle")
    sentences = shared_path("conll2003", "dev.txt").read_text(encoding="utf-8").split("\n\n")[1:25]
    conll = directory / "dev.txt"
    conll.write_text("\n\n".join(sentences) + "\n", encoding="utf-8")
    run_dir = directory / "run"
    run_dir.mkdir()
    config = RunConfig.from_flat(dict(
        task="ner", model_name_or_path=str(tiny_checkpoint), train_file=str(conll), validation_file=str(conll),
        max_seq_length=32, output_dir=str(run_dir), quantize_int8=False,
    ))
    artifacts.save_config(config, run_dir)
    label_map = LabelMap(NER_LABELS)
    model, _ = build_classifier(tiny_checkpoint, label_map, task="ner")
    model.classifier.kernel.assign(model.classifier.kernel * 30.0)  # clear margins for the parity check
    save_pretrained(model, load_tokenizer(tiny_checkpoint), run_dir / artifacts.MODEL_DIR)
    examples = read_token_examples(str(conll), config.data)
    export_bundle(model, run_dir, validation_data=(examples, encode_labels("ner", label_map, examples)))
    return run_dir / artifacts.ONNX_DIR


def oracle_predictor(bundle_dir: Path, tags: dict[str, str]):
    """A Predictor of the bundle whose model tags each word piece by a lookup (`tags`, else O),
    so what the Predictor makes of the tags can be checked exactly."""
    from tfsft.inference import Predictor

    predictor = Predictor(bundle_dir)
    vocabulary = predictor.encoder.tokenizer
    index = {label: i for i, label in enumerate(predictor.labels)}

    def run(padded):
        ids = padded["input_ids"]
        logits = np.zeros((*ids.shape, len(predictor.labels)), dtype=np.float32)
        for position, token_id in np.ndenumerate(ids):
            logits[(*position, index[tags.get(vocabulary.id_to_token(int(token_id)), "O")])] = 10.0
        return logits

    predictor.run = run
    return predictor


def test_entities_from_raw_text_leave_punctuation_out(ner_bundle):
    """`Blackburn,` and `(Berlin)` are three words each, as CoNLL splits them: the span ends at the
    name, and the name, not `(`, decides the tag of `Berlin`."""
    predictor = oracle_predictor(ner_bundle, {"peter": "B-PER", "blackburn": "I-PER", "berlin": "B-LOC"})
    text = 'Peter Blackburn, (Berlin) said "no".'
    [result] = predictor.predict([text])
    assert [(e["entity"], e["start"], e["end"], e["text"]) for e in result.entities] == [
        ("PER", 0, 15, "Peter Blackburn"), ("LOC", 18, 24, "Berlin")
    ]
    assert result.entities[0]["score"] == pytest.approx(np.exp(10) / (np.exp(10) + len(NER_LABELS) - 1))
    assert result.to_dict() == {"entities": result.entities, "truncated": False}


def test_words_cut_off_by_max_seq_length_are_flagged(ner_bundle):
    predictor = oracle_predictor(ner_bundle, {"berlin": "B-LOC"})
    long_text = " ".join(["Berlin"] * 40)  # 40 words, 30 of which fit in 32 positions with [CLS] and [SEP]
    short, cut = predictor.predict(["Berlin, Berlin", long_text])
    assert short.truncated is False and [e["text"] for e in short.entities] == ["Berlin", "Berlin"]
    assert cut.truncated is True and cut.to_dict()["truncated"] is True
    assert len(cut.entities) == 30 and cut.entities[-1]["end"] == len(" ".join(["Berlin"] * 30))
    assert predictor.predict([""])[0].to_dict() == {"entities": [], "truncated": False}


def test_tag_chunks_agree_with_seqeval():
    """Serving decodes spans as evaluation (seqeval) does, on IOB1, IOB2, IOBES, BILOU and malformed tags."""
    import warnings

    from seqeval.metrics.sequence_labeling import get_entities

    from tfsft.inference import tag_chunks

    named = [
        ["B-PER", "I-PER", "O", "B-LOC"],  # IOB2
        ["I-PER", "I-PER", "I-LOC", "O", "I-LOC", "B-LOC"],  # IOB1
        ["S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "E-PER"],  # IOBES
        ["U-PER", "B-LOC", "L-LOC", "U-LOC", "U-LOC"],  # BILOU
        ["I-PER", "B-PER", "O", "E-PER", "I-PER"],
        ["PER", "B", "I", ".", "-", "B-", "X-ORG", "O", "I-MISC-X", "o"],  # malformed
        [],
    ]
    alphabet = ["O", "B-PER", "I-PER", "E-PER", "S-PER", "L-PER", "U-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC",
                "PER", "B", "I", ".", "-", "B-", "X-PER", "I-MISC-X", "o"]
    rng = np.random.default_rng(0)
    sequences = named + [[str(t) for t in rng.choice(alphabet, size=int(rng.integers(0, 12)))] for _ in range(3000)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for tags in sequences:
            assert tag_chunks(tags) == get_entities(list(tags)), tags
    assert tag_chunks(named[0]) == [("PER", 0, 1), ("LOC", 3, 3)]


def read_all(text: str, fmt: str = "jsonl", fields=None):
    import io

    from tfsft.inference import read_inputs

    kwargs = {} if fields is None else {"fields": fields}
    return [item for _, item in read_inputs(io.StringIO(text), fmt, "in", **kwargs)]


def test_input_fields_follow_the_runs_columns():
    from tfsft.errors import DataError
    from tfsft.inference import InputFields

    lines = '{"review": "great", "text": "other", "sentence2": "ignored"}\n{"text": "only text"}\n'
    single = InputFields.for_run("review", None)
    assert read_all(lines, fields=single) == ["great", "only text"]
    assert read_all(lines) == [("other", "ignored"), "only text"]  # no columns recorded: as before
    pair = InputFields.for_run("question", "sentence")
    assert read_all('{"question": "q?", "sentence": "s."}\n{"text": "t", "text_pair": "p"}\n', fields=pair) == [
        ("q?", "s."), ("t", "p")]
    with pytest.raises(DataError, match=r"in: line 1: no text pair field.*\['sentence', 'text_pair'"):
        read_all('{"question": "q?"}\n', fields=pair)
    tsv = "id\treview\tsentence2\n1\tfine film\tnot read\n"
    assert read_all(tsv, "tsv", fields=single) == ["fine film"]


def test_input_field_overrides_are_strict():
    from tfsft.errors import DataError
    from tfsft.inference import InputFields

    fields = InputFields.for_run("review", None, text_column="body")
    assert read_all('{"body": "b", "review": "r"}\n', fields=fields) == ["b"]
    with pytest.raises(DataError, match=r"in: line 1: no text field; expected one of \['body'\]"):
        read_all('{"review": "r"}\n', fields=fields)
    fields = InputFields.for_run("review", None, text_pair_column="second")
    assert read_all('{"review": "r", "second": "s"}\n', fields=fields) == [("r", "s")]
    assert InputFields.for_run(None, None, text_pair_column="b").pair == ("b",)


def test_predict_script_reads_the_columns_the_run_trained_on(bundle, tmp_path):
    from tfsft.inference import Predictor

    _, bundle_dir, examples = bundle
    copy = tmp_path / "onnx"
    shutil.copytree(bundle_dir, copy)
    config = json.loads((copy / artifacts.CONFIG_FILE).read_text())
    config["data"].update(text_column="review", text_pair_column=None)
    (copy / artifacts.CONFIG_FILE).write_text(json.dumps(config))
    reviews, others = examples.texts[:4], examples.texts[4:8]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": o, "review": r, "sentence2": o}) + "\n" for r, o in zip(reviews, others)))
    predictor = Predictor(copy)

    result = run_script("predict.py", str(copy), "--input", str(source), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = predictor.predict(reviews)
    assert len(rows) == len(expected)
    for row, prediction in zip(rows, expected):
        assert row["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-6)

    result = run_script("predict.py", str(copy), "--input", str(source), "--text_column", "text",
                        "--text_pair_column", "sentence2", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = predictor.predict(list(zip(others, others)))
    assert len(rows) == len(expected)
    for row, prediction in zip(rows, expected):
        assert row["probabilities"] == pytest.approx(prediction.probabilities, abs=1e-6)


def test_entities_csv_row_says_whether_the_text_was_truncated():
    import csv

    from tfsft.inference import Entities, csv_header, format_csv_row

    span = {"entity": "LOC", "start": 0, "end": 6, "text": "Berlin", "score": 0.5}
    assert csv_header(NER_LABELS, "ner") == "entities,truncated\n"
    row = format_csv_row(Entities([span], truncated=True), NER_LABELS)
    assert list(csv.reader([row])) == [[json.dumps([span]), "true"]]
