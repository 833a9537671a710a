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


def test_import_is_tensorflow_free():
    code = (
        "import sys, tfsft.inference, tfsft.serving; "
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
