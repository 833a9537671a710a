"""Question answering end to end on SQuAD v1.1 slices with the tiny BERT: windows of long
contexts, training on span positions, SQuAD metrics per epoch, parity-gated export of the start
and end logits, and the Predictor, `tfsft predict`, `tfsft evaluate` and the server answering
from the bundle as evaluation answered from Keras."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script, shared_path
from tfsft import artifacts
from tfsft.config import RunConfig
from tfsft.errors import ConfigError, DataError

MAX_SEQ_LENGTH = 96
DOC_STRIDE = 32


def write_squad_slice(source: Path, target: Path, questions: int) -> Path:
    """The first paragraphs of an official SQuAD JSON file holding `questions` questions."""
    document = json.loads(source.read_text(encoding="utf-8"))
    kept, count = [], 0
    for article in document["data"]:
        paragraphs = []
        for paragraph in article["paragraphs"]:
            if count >= questions:
                break
            qas = paragraph["qas"][: questions - count]
            paragraphs.append({"context": paragraph["context"], "qas": qas})
            count += len(qas)
        if paragraphs:
            kept.append({"title": article["title"], "paragraphs": paragraphs})
        if count >= questions:
            break
    target.write_text(json.dumps({"version": document["version"], "data": kept}), encoding="utf-8")
    return target


def squad_rows(path: Path) -> list[dict]:
    """The questions of a SQuAD JSON file as the Hub's squad rows."""
    rows = []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                rows.append({
                    "id": qa["id"], "question": qa["question"], "context": paragraph["context"],
                    "answers": {"text": [a["text"] for a in qa["answers"]],
                                "answer_start": [a["answer_start"] for a in qa["answers"]]},
                })
    return rows


@pytest.fixture(scope="module")
def squad_slices(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("squad")
    train = write_squad_slice(shared_path("squad-v1.1", "train-v1.1.json"), directory / "train.json", 240)
    dev = write_squad_slice(shared_path("squad-v1.1", "dev-v1.1.json"), directory / "dev.json", 48)
    dev_jsonl = directory / "dev.jsonl"
    dev_jsonl.write_text("".join(json.dumps(row) + "\n" for row in squad_rows(dev)), encoding="utf-8")
    return {"train": train, "dev": dev, "dev_jsonl": dev_jsonl}


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, tiny_checkpoint, squad_slices):
    from tfsft import finetune

    config = RunConfig.from_flat(dict(
        task="qa", model_name_or_path=str(tiny_checkpoint), train_file=str(squad_slices["train"]),
        validation_file=str(squad_slices["dev_jsonl"]), max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE,
        num_train_epochs=2, learning_rate=3e-3, warmup_ratio=0.0, per_device_train_batch_size=16,
        output_dir=str(tmp_path_factory.mktemp("qa") / "run"),
    ))
    return finetune(config, verbose=0)


def test_qa_config_defaults_and_checks():
    config = RunConfig.from_flat({"task": "qa"})
    assert config.data.max_seq_length == 384 and config.data.doc_stride == 128
    assert config.train.metric_for_best_model == "f1"
    assert RunConfig().data.max_seq_length == 128
    with pytest.raises(ConfigError, match="doc_stride"):
        RunConfig.from_flat({"task": "qa", "max_seq_length": 128})
    with pytest.raises(ConfigError, match="metric_for_best_model"):
        RunConfig.from_flat({"task": "qa", "metric_for_best_model": "accuracy"})
    with pytest.raises(ConfigError, match="pooling"):
        RunConfig.from_flat({"task": "qa", "pooling": "mean"})


def test_qa_trains_on_windows_and_keeps_the_best_f1_epoch(qa_run):
    metrics, out = qa_run.metrics, qa_run.run_dir
    assert metrics["eval_samples"] == 48 and metrics["train_samples"] == 240
    # contexts run past one 96-token window, so there are more windows than questions
    assert metrics["eval_windows"] > 48 and metrics["train_windows"] > 240
    for key in ("eval_f1", "eval_exact_match"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["eval_f1"] >= metrics["eval_exact_match"]
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    lines = (out / "history.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, row.split(",")))) for row in lines[1:]]
    assert len(rows) == 2 and {"val_f1", "val_exact_match", "val_loss"} <= set(rows[0])
    assert metrics["eval_f1"] == pytest.approx(max(r["val_f1"] for r in rows), abs=1e-6)
    report = json.loads((out / "eval_report.json").read_text())
    predictions = report["predictions"]
    assert len(predictions) == 48
    contexts = {row["id"]: row["context"] for row in squad_rows_from_jsonl(out)}
    for p in predictions:
        assert contexts[p["id"]][p["start"]:p["end"]] == p["answer"]
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["architectures"] == ["BertForQuestionAnswering"]  # transformers drops the "TF"


def squad_rows_from_jsonl(run_dir: Path) -> list[dict]:
    config = json.loads((run_dir / "config.json").read_text())
    path = Path(config["data"]["validation_file"])
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_qa_bundle_matches_keras_and_answers_like_evaluation(qa_run, squad_slices):
    from tfsft.inference import Answer, Predictor

    out = qa_run.run_dir
    report = json.loads((out / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    fused = report["parity"][artifacts.BUNDLE_MODEL_FUSED]
    for batch in ("batch_1", "batch_8", "batch_8_padded"):
        assert fused[batch]["max_abs_logit_diff"] < 1e-4, batch
        assert fused[batch]["label_agreement"] in (None, 1.0)
    assert "keras_f1" in report and "f1_drop" in report["int8"]
    meta = json.loads((out / "onnx" / artifacts.BUNDLE_FILE).read_text())
    assert meta["task"] == "qa" and meta["labels"] == ["start", "end"]
    assert meta["doc_stride"] == DOC_STRIDE and meta["max_seq_length"] == MAX_SEQ_LENGTH

    rows = squad_rows_from_jsonl(out)
    predictor = Predictor(out / "onnx", int8=False)
    answers = predictor.predict([{"question": r["question"], "context": r["context"]} for r in rows])
    assert all(isinstance(a, Answer) for a in answers)
    expected = {p["id"]: p for p in json.loads((out / "eval_report.json").read_text())["predictions"]}
    same = [a.answer == expected[r["id"]]["answer"] and a.start == expected[r["id"]]["start"] for a, r in zip(answers, rows)]
    assert np.mean(same) >= 0.95, same
    for answer, row in zip(answers, rows):
        assert row["context"][answer.start:answer.end] == answer.answer
    assert predictor.predict([(rows[0]["question"], rows[0]["context"])])[0] == answers[0]
    with pytest.raises(ValueError, match="input 1: 'context' must be a non-empty string"):
        predictor.predict([{"question": "q", "context": "c"}, {"question": "q", "context": " "}])


def test_qa_int8_quantizes_every_weight_per_column_and_reports_its_f1_drop(qa_run):
    """The span head and every encoder MatMul and Attention of the int8 model have a scale per
    output column (one per matrix cost QA several F1 points: start and end argmaxes are sensitive
    to rounding noise), and the report's int8 F1 and drop are the int8 model's, recomputed here."""
    import onnx
    import onnxruntime as ort

    from tfsft.data import LabelMap, LengthBatchedData
    from tfsft.tasks.qa import span_metrics, span_reference
    from tfsft.export import recorded_validation
    from tfsft.tokenize import TextEncoder

    run_dir, bundle = qa_run.run_dir, qa_run.run_dir / artifacts.ONNX_DIR
    model = onnx.load(str(bundle / artifacts.BUNDLE_MODEL_INT8))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    zero_point_input = {"MatMulInteger": 3, "QAttention": 7}
    quantized = [node for node in model.graph.node if node.op_type in zero_point_input]
    fused = [node.op_type for node in onnx.load(str(bundle / artifacts.BUNDLE_MODEL_FUSED)).graph.node]
    assert len(quantized) == fused.count("MatMul") + fused.count("Attention")
    assert any("qa_outputs" in node.input[1] for node in quantized), "the span head is quantized"
    for node in quantized:
        columns = initializers[node.input[1]].dims[-1]
        zero_points = initializers[node.input[zero_point_input[node.op_type]]].dims
        assert list(zero_points) == [columns], (node.name, list(zero_points))

    report = json.loads((bundle / artifacts.BUNDLE_REPORT).read_text())
    meta = json.loads((bundle / artifacts.BUNDLE_FILE).read_text())
    config = artifacts.read_config(run_dir)
    encoder = TextEncoder.from_file(bundle / artifacts.BUNDLE_TOKENIZER, MAX_SEQ_LENGTH)
    reference = span_reference(encoder, recorded_validation(run_dir), config.data)
    data = LengthBatchedData(reference.windows.encoded, None, 8, shuffle=False, pad_id=encoder.pad_id,
                             feature_names=meta["inputs"])
    session = ort.InferenceSession(str(bundle / artifacts.BUNDLE_MODEL_INT8), providers=["CPUExecutionProvider"])
    chunks = [session.run(["logits"], features)[0] for features in data]
    logits = np.zeros((len(reference.windows), MAX_SEQ_LENGTH, 2), dtype=np.float32)
    for rows, chunk in zip(data.batches(), chunks):
        logits[rows, : chunk.shape[1]] = chunk
    int8_f1 = span_metrics(reference, logits, LabelMap(("start", "end")), "int8")[0]["int8_f1"]
    assert report["keras_f1"] == pytest.approx(qa_run.metrics["eval_f1"], abs=1e-6)
    assert report["int8"]["f1"] == pytest.approx(int8_f1, abs=1e-9)
    assert report["int8"]["f1_drop"] == pytest.approx(report["keras_f1"] - int8_f1, abs=1e-9)
    assert report["int8"]["weight_scales"] == "per_channel"


def test_qa_server_and_predict_command(qa_run, tmp_path):
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import create_app

    out = qa_run.run_dir
    rows = squad_rows_from_jsonl(out)[:3]
    predictor = Predictor(out / "onnx")
    expected = [a.to_dict() for a in predictor.predict([(r["question"], r["context"]) for r in rows])]
    with TestClient(create_app(predictor)) as client:
        body = {"questions": [{"question": r["question"], "context": r["context"]} for r in rows]}
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"] == expected
        bad = client.post("/predict", json={"questions": [body["questions"][0], {"question": "why?"}]})
        assert bad.status_code == 400 and '"questions"[1].context' in bad.json()["error"]
        texts = client.post("/predict", json={"texts": ["a text"]})
        assert texts.status_code == 400 and "questions" in texts.json()["error"]
        assert client.get("/metadata").json()["task"] == "qa"

    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps({"question": r["question"], "context": r["context"]}) + "\n" for r in rows))
    result = run_script("predict.py", str(out / "onnx"), "--input", str(inputs), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [json.loads(line) for line in result.stdout.splitlines()] == expected
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question": "who?"}) + "\n")
    result = run_script("predict.py", str(out / "onnx"), "--input", str(missing), timeout=300)
    assert result.returncode != 0 and "missing.jsonl: line 1" in result.stderr and "Traceback" not in result.stderr


def test_qa_run_reevaluates_the_same(qa_run, squad_slices):
    from tfsft.pipeline import evaluate_run

    metrics = evaluate_run(str(qa_run.run_dir), str(squad_slices["dev"]))
    assert metrics["eval_f1"] == pytest.approx(qa_run.metrics["eval_f1"], abs=1e-6)
    assert metrics["eval_exact_match"] == pytest.approx(qa_run.metrics["eval_exact_match"], abs=1e-6)


def test_qa_without_answers_needs_version_2(tmp_path, tiny_checkpoint, squad_slices):
    from tfsft import finetune

    rows = squad_rows(squad_slices["dev"])[:20]
    rows[3]["answers"] = {"text": [], "answer_start": []}
    path = tmp_path / "unanswerable.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = RunConfig.from_flat(dict(
        task="qa", model_name_or_path=str(tiny_checkpoint), train_file=str(path), validation_file=str(path),
        max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE, output_dir=str(tmp_path / "run"), export=False,
    ))
    with pytest.raises(DataError, match=rf"unanswerable.jsonl: question '{rows[3]['id']}' has no answer.*--version_2_with_negative"):
        finetune(config, verbose=0)
    assert not (tmp_path / "run").exists()


def test_squad_v2_style_run_chooses_and_ships_a_null_threshold(tmp_path, tiny_checkpoint, squad_slices):
    """Questions asked of another paragraph have no answer; the run tunes the null threshold on
    validation, scores answerable and unanswerable questions apart, and the bundle answers "" as
    evaluation did."""
    from tfsft import finetune
    from tfsft.inference import Predictor

    rows = squad_rows(squad_slices["train"])[:120]
    contexts = sorted({row["context"] for row in rows})
    for number, row in enumerate(rows):
        if number % 3 == 0:
            others = [c for c in contexts if c != row["context"]]
            row["context"] = others[number % len(others)]
            row["answers"] = {"text": [], "answer_start": []}
    path = tmp_path / "v2.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = finetune(RunConfig.from_flat(dict(
        task="qa", model_name_or_path=str(tiny_checkpoint), train_file=str(path), validation_split_percentage=25,
        version_2_with_negative=True, max_seq_length=MAX_SEQ_LENGTH, doc_stride=DOC_STRIDE, learning_rate=3e-3,
        per_device_train_batch_size=16, output_dir=str(tmp_path / "run"), export_variants="fused",
    )), verbose=0)
    metrics, out = result.metrics, result.run_dir
    for key in ("eval_has_ans_f1", "eval_no_ans_f1", "eval_has_ans_exact_match", "eval_no_ans_exact_match"):
        assert 0.0 <= metrics[key] <= 1.0, key
    threshold = metrics["eval_null_threshold"]
    report = json.loads((out / "eval_report.json").read_text())
    assert report["decision"] == {"null_threshold": threshold}
    assert json.loads((out / "onnx" / artifacts.BUNDLE_FILE).read_text())["decision"]["null_threshold"] == threshold
    validation = [json.loads(line) for line in (out / artifacts.VALIDATION_EXAMPLES).read_text().splitlines()][0]
    answers = Predictor(out / "onnx").predict(list(zip(validation["questions"], validation["contexts"])))
    expected = [p["answer"] for p in report["predictions"]]
    assert np.mean([a.answer == e for a, e in zip(answers, expected)]) >= 0.95


def test_bad_squad_file_is_one_line_before_anything_is_written(tmp_path, squad_slices):
    document = json.loads(squad_slices["dev"].read_text())
    qa = document["data"][0]["paragraphs"][0]["qas"][1]
    qa["answers"][0]["answer_start"] += 3
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(document))
    result = run_script(
        "finetune.py", "--task", "qa", "--train_file", str(bad), "--output_dir", str(tmp_path / "out"), timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "bad.json" in errors[0] and qa["id"] in errors[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_saved_qa_model_loads_with_transformers_own_auto_class(qa_run):
    from transformers import TFAutoModelForQuestionAnswering

    from tfsft.modeling import load_finetuned

    model_dir = qa_run.run_dir / "model"
    ours = load_finetuned(model_dir, "qa")
    theirs = TFAutoModelForQuestionAnswering.from_pretrained(str(model_dir))
    inputs = {"input_ids": np.array([[101, 2040, 102, 2198, 2626, 2009, 102]], dtype=np.int32)}
    stacked = ours(inputs).logits.numpy()
    plain = theirs(inputs)
    np.testing.assert_allclose(stacked[..., 0], plain.start_logits.numpy(), atol=1e-6)
    np.testing.assert_allclose(stacked[..., 1], plain.end_logits.numpy(), atol=1e-6)


def test_dataset_name_squad_reads_the_hub_rows(monkeypatch, squad_slices):
    """`--dataset_name squad` through a stand-in `datasets` module serving the Hub's squad rows."""
    import sys
    import types

    from tfsft.data import load_splits

    rows = squad_rows(squad_slices["dev"])
    module = types.ModuleType("datasets")
    module.load_dataset = lambda name, config_name=None: {"train": rows[:30], "validation": rows[30:]}
    monkeypatch.setitem(sys.modules, "datasets", module)
    config = RunConfig.from_flat({"task": "qa", "dataset_name": "squad", "max_train_samples": 12})
    splits = load_splits(config.data, 0, task="qa")
    assert len(splits.train) == 12 and len(splits.validation) == len(rows) - 30
    assert splits.train.source == "squad[train]"
    by_id = {row["id"]: row for row in rows}
    for i, question_id in enumerate(splits.validation.ids):
        row = by_id[question_id]
        assert splits.validation.questions[i] == row["question"]
        assert splits.validation.answers[i][0] == (row["answers"]["text"][0], row["answers"]["answer_start"][0])
    rows[31]["answers"] = {"text": ["x"]}
    with pytest.raises(DataError, match=r"squad\[validation\]: row 2: field 'answers'"):
        load_splits(config.data, 0, task="qa")
