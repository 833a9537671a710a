"""A multi-task run's ONNX bundle: one graph with an output per head, checked head by head; the
Predictor, `tfsft predict --task` and the server answering each task as a single-task bundle of
that head would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import env_without_tensorflow
from tfsft import artifacts

TASK_NAMES = ["sentiment", "similarity", "entities"]
TEXTS = ["a wonderful, moving film", "dull", "it was fine i guess, nothing special at all"]
PAIRS = [("A man is playing a guitar.", "A man plays the guitar."), ("A cat sleeps.", "Stocks fell sharply today.")]
SENTENCES = ["John Smith flew from London to New York on Monday .", "EU rejects German call ."]


def validation_of(run_dir: Path, model) -> dict:
    """{task: (recorded validation examples, label ids)}, as a finished run hands them to the export."""
    from tfsft.data import LabelMap, encode_labels
    from tfsft.export import recorded_validation

    config = artifacts.read_config(run_dir)
    labels = {spec.name: LabelMap(spec.labels) for spec in model.specs}
    validation = {}
    for entry in config.tasks:
        examples = recorded_validation(run_dir / "tasks" / entry.name)
        validation[entry.name] = (examples, encode_labels(entry.task, labels[entry.name], examples, entry.data.label_delimiter))
    return validation


@pytest.fixture(scope="module")
def keras_model(multitask_run):
    from tfsft.multitask_model import load_multitask

    return load_multitask(multitask_run / artifacts.MODEL_DIR)


@pytest.fixture(scope="module")
def exported(multitask_run, keras_model, tmp_path_factory) -> Path:
    """A copy of the multi-task run, exported as `finetune` exports it (the model in memory)."""
    from tfsft.export_multitask import export_multitask_bundle

    run_dir = Path(shutil.copytree(multitask_run, tmp_path_factory.mktemp("mt-export") / "run"))
    export_multitask_bundle(keras_model, run_dir, validation_of(run_dir, keras_model))
    return run_dir


@pytest.fixture(scope="module")
def predictor(exported):
    from tfsft.inference import Predictor

    return Predictor(exported / artifacts.ONNX_DIR)


# ------------------------------------------------------------------------------------- export


def test_bundle_json_names_every_head_in_the_runs_order(exported, keras_model):
    bundle_dir = exported / artifacts.ONNX_DIR
    meta = json.loads((bundle_dir / artifacts.BUNDLE_FILE).read_text())
    assert meta["task"] == "multitask" and "labels" not in meta
    assert list(meta["tasks"]) == TASK_NAMES
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and meta["input_dtype"] == "int32"
    assert meta["max_seq_length"] == 64 and meta["model_type"] == "bert" and meta["pad_id"] == 0
    assert meta["files"] == {"fused": "model.fused.onnx", "int8": "model.int8.onnx"} and meta["external_data"] == {}
    specs = {spec.name: spec for spec in keras_model.specs}
    for name, entry in meta["tasks"].items():
        assert entry["task"] == specs[name].task and entry["labels"] == list(specs[name].labels)
        assert entry["id2label"] == {str(i): label for i, label in enumerate(specs[name].labels)}
        assert entry["output"] == f"logits_{name}" and isinstance(entry["decision"], dict)
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "bundle.json", "config.json", "export_report.json", "model.fused.onnx", "model.int8.onnx", "tokenizer.json",
    ]
    assert not list(exported.glob(".onnx.*"))  # the work directory was renamed into place

    import onnx

    graph = onnx.load(str(bundle_dir / "model.fused.onnx")).graph
    assert sorted(o.name for o in graph.output) == sorted(f"logits_{name}" for name in TASK_NAMES)
    assert [i.name for i in graph.input] == meta["inputs"]
    assert sum(node.op_type == "Attention" for node in graph.node) == 2  # the encoder, once


def test_the_report_checks_every_head_and_scores_int8_per_head(exported):
    report = json.loads((exported / artifacts.ONNX_DIR / artifacts.BUNDLE_REPORT).read_text())
    assert report["fusion"]["applied"] and report["int8"]["quantized_from"] == "model.fused.onnx"
    assert report["int8"]["size_ratio"] > 2 and "stages" in report
    scores = {"sentiment": "accuracy", "similarity": "spearman", "entities": "f1"}
    assert sorted(report["tasks"]) == sorted(TASK_NAMES)
    for name, head in report["tasks"].items():
        score = scores[name]
        fused = head["parity"]["model.fused.onnx"]
        assert sorted(fused) == ["batch_1", "batch_8", "batch_8_padded"]
        assert all(result["max_abs_logit_diff"] <= report["tolerance"] for result in fused.values())
        assert fused["batch_8"][score] == pytest.approx(head[f"keras_{score}"])
        int8 = head["int8"]
        assert int8[score] == head["parity"]["model.int8.onnx"]["batch_8"][score]
        assert int8[f"{score}_drop"] == pytest.approx(head[f"keras_{score}"] - int8[score])
    assert report["tasks"]["similarity"]["int8"]["label_agreement"] is None  # regression decides no labels


def test_a_head_that_fails_parity_leaves_no_bundle_and_is_named(multitask_run, keras_model, tmp_path, monkeypatch):
    from tfsft import export_multitask
    from tfsft.config import ExportConfig
    from tfsft.errors import ArtifactError

    run_dir = Path(shutil.copytree(multitask_run, tmp_path / "run"))
    original = export_multitask._head

    def skewed(model, entry, *args):
        head = original(model, entry, *args)
        if entry.name == "similarity":
            for logits in head.parity.keras.values():
                logits += 1.0
        return head

    monkeypatch.setattr(export_multitask, "_head", skewed)
    with pytest.raises(ArtifactError) as caught:
        export_multitask.export_multitask_bundle(
            keras_model, run_dir, validation_of(run_dir, keras_model), settings=ExportConfig(export_variants="fp32"),
        )
    message = str(caught.value)
    assert "\n" not in message and "model.onnx, head 'similarity'" in message and "batch_1" in message
    assert not (run_dir / artifacts.ONNX_DIR).exists() and not list(run_dir.glob(".onnx.*"))


def test_a_mixed_precision_model_is_exported_as_a_float32_graph(multitask_run, tmp_path):
    """A model computing in float16 (a --mixed_precision run's) is exported from the run's saved
    weights rebuilt in float32, and checked against that float32 model."""
    import onnx

    from tfsft.config import ExportConfig
    from tfsft.export_multitask import export_multitask_bundle
    from tfsft.modeling import computes_in_float32, tf
    from tfsft.multitask_model import load_multitask

    run_dir = Path(shutil.copytree(multitask_run, tmp_path / "run"))
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = load_multitask(run_dir / artifacts.MODEL_DIR)
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
    assert not computes_in_float32(model)
    report = export_multitask_bundle(model, run_dir, validation_of(run_dir, model), settings=ExportConfig(export_variants="fp32"))
    graph = onnx.load(str(run_dir / artifacts.ONNX_DIR / artifacts.BUNDLE_MODEL)).graph
    assert {o.type.tensor_type.elem_type for o in graph.output} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 not in {init.data_type for init in graph.initializer}
    for head in report["tasks"].values():
        assert all(r["max_abs_logit_diff"] <= 1e-4 for r in head["parity"][artifacts.BUNDLE_MODEL].values())


def test_tfsft_export_re_exports_a_multitask_run(exported, predictor, tmp_path):
    """`tfsft export RUN` on a multi-task run: a new bundle of the variants asked for, replacing the
    old; a task without a validation record has its validation file re-read."""
    from tfsft.commands.export import build_parser, run
    from tfsft.inference import Predictor

    run_dir = Path(shutil.copytree(exported, tmp_path / "run"))
    (run_dir / "tasks" / "similarity" / artifacts.VALIDATION_EXAMPLES).unlink()
    run(build_parser().parse_args([str(run_dir), "--export_variants", "fp32"]))
    bundle_dir = run_dir / artifacts.ONNX_DIR
    meta = json.loads((bundle_dir / artifacts.BUNDLE_FILE).read_text())
    assert meta["files"] == {"model": "model.onnx"} and list(meta["tasks"]) == TASK_NAMES
    report = json.loads((bundle_dir / artifacts.BUNDLE_REPORT).read_text())
    assert report["tasks"]["similarity"]["parity"]["model.onnx"]["batch_8"]["examples"] == 40
    assert not (bundle_dir / "model.fused.onnx").exists()
    plain = Predictor(bundle_dir)
    for task, inputs in (("sentiment", TEXTS), ("similarity", PAIRS)):
        np.testing.assert_allclose(plain.logits(inputs, task=task), predictor.logits(inputs, task=task), atol=1e-4)


# ---------------------------------------------------------------------------------- Predictor


def keras_logits(model, name: str, predictor, inputs) -> np.ndarray:
    """The HeadView's logits of `inputs`, tokenized and padded as the Predictor does it."""
    from tfsft.multitask_model import HeadView
    from tfsft.tokenize import pad_batch

    encoded = predictor.encode(inputs)
    padded = pad_batch(encoded, np.arange(len(encoded)), predictor.encoder.pad_id)
    features = {key: padded[key] for key in predictor.bundle.inputs}
    return HeadView(model, name)(features).logits.numpy(), encoded.lengths


def test_predictor_logits_of_each_head_are_the_keras_heads(predictor, keras_model):
    for name, inputs in (("sentiment", TEXTS), ("similarity", PAIRS)):
        expected, _ = keras_logits(keras_model, name, predictor, inputs)
        got = predictor.logits(inputs, task=name)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
    texts = ["John lives in Paris", "a much longer sentence about the European Union and Germany"]
    expected, lengths = keras_logits(keras_model, "entities", predictor, texts)
    got = predictor.logits(texts, task="entities")
    assert got.shape == (2, lengths.max(), 9)
    for row, length in enumerate(lengths):
        assert np.abs(got[row, :length] - expected[row, :length]).max() < 1e-4
        assert not got[row, length:].any()


def test_each_head_answers_as_a_single_task_bundle_of_it(predictor):
    from tfsft.inference import Entities, Prediction, Score
    from tfsft.tasks import get_task

    assert predictor.bundle.tasks == tuple(TASK_NAMES) and predictor.labels == ()
    sentiment = predictor.predict(TEXTS, task="sentiment")
    assert all(isinstance(p, Prediction) and p.label in ("0", "1") for p in sentiment)
    assert all(sum(p.probabilities.values()) == pytest.approx(1.0) for p in sentiment)
    view = predictor.for_task("sentiment")
    assert view.bundle.task == "classification" and view.labels == ("0", "1") and view.session is predictor.session
    assert sentiment == get_task("classification").decode(predictor.logits(TEXTS, task="sentiment"), view.bundle)
    scores = predictor.predict(PAIRS, task="similarity")
    assert all(isinstance(s, Score) and np.isfinite(s.score) for s in scores)
    assert predictor.predict_one(PAIRS[0], task="similarity").score == pytest.approx(scores[0].score, abs=1e-5)
    entities = predictor.predict(SENTENCES, task="entities")
    assert all(isinstance(e, Entities) for e in entities)
    for text, found in zip(SENTENCES, entities):
        for span in found.entities:
            assert text[span["start"]:span["end"]] == span["text"]
    with pytest.raises(ValueError, match="single texts"):
        predictor.predict(PAIRS, task="entities")


def test_the_task_is_required_and_checked(predictor):
    from tfsft.errors import ConfigError

    tasks = "['sentiment', 'similarity', 'entities']"
    for task, message in ((None, "needs a task"), ("nope", "unknown task"), (3, "unknown task")):
        with pytest.raises(ConfigError, match="one of" if task is None else "tasks are") as caught:
            predictor.predict(TEXTS, task=task)
        assert message in str(caught.value) and tasks in str(caught.value)
        with pytest.raises(ConfigError):
            predictor.logits(TEXTS, task=task)
    with pytest.raises(ConfigError, match="has one task \\(classification\\): pass no task"):
        predictor.for_task("sentiment").predict(TEXTS, task="sentiment")  # a single-task bundle's Predictor
    with pytest.raises(ConfigError, match="tasks are"):
        predictor.bundle.head("nope")


def tampered(exported: Path, tmp_path: Path, change) -> Path:
    bundle_dir = Path(shutil.copytree(exported / artifacts.ONNX_DIR, tmp_path / "bundle"))
    meta = json.loads((bundle_dir / artifacts.BUNDLE_FILE).read_text())
    change(meta)
    (bundle_dir / artifacts.BUNDLE_FILE).write_text(json.dumps(meta))
    return bundle_dir


@pytest.mark.parametrize("change, message", [
    (lambda meta: meta.pop("tasks"), 'needs a "tasks" object'),
    (lambda meta: meta["tasks"]["similarity"].pop("output"), "tasks.similarity: missing or invalid field 'output'"),
    (lambda meta: meta["tasks"]["entities"].update(task="causal_lm"), "tasks.entities: a head's task is one of"),
    (lambda meta: meta["tasks"]["sentiment"].update(labels=["only"]), "tasks.sentiment: a classification label map"),
    (lambda meta: meta["tasks"]["sentiment"].update(output="logits_gone"), "no output 'logits_gone' for task 'sentiment'"),
    (lambda meta: meta["tasks"]["entities"].update(labels=["B-X", "O"]), "outputs 9 logits but"),
])
def test_a_tampered_multitask_bundle_is_a_one_line_artifact_error(exported, tmp_path, change, message):
    from tfsft.errors import ArtifactError
    from tfsft.inference import Predictor

    with pytest.raises(ArtifactError) as caught:
        Predictor(tampered(exported, tmp_path, change))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_auto_precision_takes_int8_only_if_every_head_holds_up(exported, tmp_path):
    from tfsft.inference import Bundle, choose_precision

    def set_drop(drop):
        def change(report):
            report["tasks"]["similarity"]["int8"]["spearman_drop"] = drop
            for name in ("sentiment", "entities"):
                score = next(key for key in report["tasks"][name]["int8"] if key.endswith("_drop"))
                report["tasks"][name]["int8"][score] = 0.0
        return change

    for drop, int8 in ((0.005, True), (0.05, False)):
        bundle_dir = Path(shutil.copytree(exported / artifacts.ONNX_DIR, tmp_path / f"bundle-{drop}"))
        report = json.loads((bundle_dir / artifacts.BUNDLE_REPORT).read_text())
        set_drop(drop)(report)
        (bundle_dir / artifacts.BUNDLE_REPORT).write_text(json.dumps(report))
        choice = choose_precision(Bundle.load(bundle_dir))
        assert choice.int8 is int8 and "similarity: validation spearman" in choice.reason


# ---------------------------------------------------------------------------- tfsft predict


def test_predict_command_reads_each_tasks_fields_without_tensorflow(exported, tmp_path):
    bundle_dir = exported / artifacts.ONNX_DIR
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"sentence1": a, "sentence2": b}) + "\n" for a, b in PAIRS))
    texts = tmp_path / "texts.csv"
    texts.write_text("text\n" + "".join(f'"{s}"\n' for s in SENTENCES))
    env = env_without_tensorflow(tmp_path / "no-tf")

    def predict(*args):
        return subprocess.run([sys.executable, "-m", "tfsft", "predict", str(bundle_dir), *args],
                              capture_output=True, text=True, timeout=120, env=env)

    scored = predict("--input", str(pairs), "--task", "similarity", "--output", str(tmp_path / "out.jsonl"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    from tfsft.inference import Predictor

    expected = [p.score for p in Predictor(bundle_dir).predict(PAIRS, task="similarity")]
    got = [json.loads(line)["score"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == pytest.approx(expected, abs=1e-6)
    tagged = predict("--input", str(texts), "--task", "entities", "--output_format", "csv")
    assert tagged.returncode == 0 and tagged.stdout.splitlines()[0] == "entities,truncated"
    assert len(tagged.stdout.splitlines()) == 3
    for args, message in ((["--input", str(pairs)], "needs a task"), (["--input", str(pairs), "--task", "nope"], "unknown task")):
        refused = predict(*args)
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
        assert refused.returncode != 0 and len(errors) == 1, refused.stderr[-2000:]
        assert message in errors[0] and "['sentiment', 'similarity', 'entities']" in errors[0] and "--task" in errors[0]


# ----------------------------------------------------------------------------------- serving


def test_serving_answers_each_task_and_lists_them(predictor):
    from starlette.testclient import TestClient

    from tfsft.serving import Batching, create_app

    for batching in (Batching(), None):
        with TestClient(create_app(predictor, batching=batching)) as client:
            for task, body in (("sentiment", {"texts": TEXTS}), ("similarity", {"pairs": [list(p) for p in PAIRS]}),
                               ("entities", {"texts": SENTENCES})):
                answer = client.post("/predict", json={"task": task, **body})
                inputs = body.get("texts") or PAIRS
                assert answer.status_code == 200
                assert answer.json()["predictions"] == [p.to_dict() for p in predictor.predict(inputs, task=task)]
            meta = client.get("/metadata").json()
            assert meta["task"] == "multitask"
            assert meta["tasks"] == [
                {"name": "sentiment", "task": "classification", "labels": ["0", "1"]},
                {"name": "similarity", "task": "regression", "labels": ["score"]},
                {"name": "entities", "task": "ner", "labels": list(predictor.for_task("entities").labels)},
            ]


@pytest.mark.parametrize("body, message", [
    ({"texts": ["x"]}, 'name the task in "task"'),
    ({"task": "nope", "texts": ["x"]}, 'unknown "task"'),
    ({"task": ["sentiment"], "texts": ["x"]}, 'unknown "task"'),
])
def test_a_missing_or_unknown_task_is_a_400_naming_the_field_and_the_tasks(predictor, body, message):
    from starlette.testclient import TestClient

    from tfsft.serving import create_app

    with TestClient(create_app(predictor)) as client:
        answer = client.post("/predict", json=body)
    assert answer.status_code == 400
    assert message in answer.json()["error"] and "['sentiment', 'similarity', 'entities']" in answer.json()["error"]


def test_a_task_the_model_cannot_take_or_a_task_for_a_single_task_model_is_a_400(predictor):
    from starlette.testclient import TestClient

    from tfsft.serving import create_app

    with TestClient(create_app(predictor)) as client:
        pairs = client.post("/predict", json={"task": "entities", "pairs": [["a", "b"]]})
        generate = client.post("/generate", json={"prompts": ["a"]})
    assert pairs.status_code == 400 and "tags single texts" in pairs.json()["error"]
    assert generate.status_code == 400 and '"task"' in generate.json()["error"]
    with TestClient(create_app(predictor.for_task("sentiment"))) as client:  # one head, served alone
        assert client.post("/predict", json={"texts": TEXTS}).status_code == 200
        refused = client.post("/predict", json={"task": "sentiment", "texts": TEXTS})
    assert refused.status_code == 400 and 'send no "task"' in refused.json()["error"]


def test_serve_names_the_tasks_when_it_starts(exported, monkeypatch, capsys):
    import uvicorn

    from tfsft.serving import ServeSettings, serve

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    serve(ServeSettings(bundle_dir=str(exported / artifacts.ONNX_DIR), precision="fp32"))
    line = capsys.readouterr().err
    assert 'tasks (name "task" in each /predict body): sentiment (classification), similarity (regression), ' \
           "entities (ner)" in line and "fp32 model model.fused.onnx" in line


def test_micro_batches_never_mix_tasks(exported):
    """A burst of requests of all three tasks while the one batch worker is held: the queued ones
    are merged into calls of one task each, and every request gets its own task's answers."""
    from starlette.testclient import TestClient

    from tfsft.inference import Predictor
    from tfsft.serving import Batching, create_app

    predictor = Predictor(exported / artifacts.ONNX_DIR)
    calls, held, release = [], threading.Event(), threading.Event()
    predict = predictor.predict

    def recording_predict(inputs, task=None):
        calls.append((task, list(inputs)))
        if not held.is_set():
            held.set()
            release.wait(10)
        return predict(inputs, task=task)

    predictor.predict = recording_predict
    requests = [
        ("sentiment", {"texts": [TEXTS[i % 3]]}) if i % 3 == 0 else
        ("similarity", {"pairs": [list(PAIRS[i % 2])]}) if i % 3 == 1 else
        ("entities", {"texts": [SENTENCES[i % 2]]})
        for i in range(18)
    ]
    app = create_app(predictor, batching=Batching(concurrency=1, max_input_chars=None))
    with TestClient(app) as client, ThreadPoolExecutor(len(requests) + 1) as pool:
        first = pool.submit(client.post, "/predict", json={"task": "sentiment", "texts": ["first"]})
        assert held.wait(10)
        futures = [pool.submit(client.post, "/predict", json={"task": task, **body}) for task, body in requests]
        deadline = time.monotonic() + 10
        while app.state.batcher._queue.qsize() < len(requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        release.set()
        answers = [future.result() for future in futures]
        assert first.result().status_code == 200
        metrics = client.get("/metrics").text
    predictor.predict = predict
    for (task, body), answer in zip(requests, answers):
        inputs = body.get("texts") or [tuple(body["pairs"][0])]
        assert answer.status_code == 200
        assert answer.json()["predictions"] == [p.to_dict() for p in predictor.predict(inputs, task=task)]
    assert sorted(task for task, _ in calls[1:]) == ["entities", "sentiment", "similarity"]  # one call per task
    assert sorted(len(inputs) for _, inputs in calls[1:]) == [6, 6, 6]
    assert "tfsft_batch_texts_count 4.0" in metrics
