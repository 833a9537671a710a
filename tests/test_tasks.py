"""The task registry (`tfsft.tasks`: every task complete, no stage switching on task names), and
the tasks beyond single-label classification: regression on an STS-B slice with the tiny BERT
(train, best epoch by Spearman, metrics, export parity, Predictor and server output), multilabel,
NER, and the task metrics against values worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_script, shared_path, write_conll_slice, write_tsv_slice
from tfsft import artifacts
from tfsft.config import RunConfig
from tfsft.data import LabelMap, read_examples
from tfsft.errors import ConfigError, DataError
from tfsft.tasks.regression import encode_targets


@pytest.fixture(scope="module")
def stsb_slices(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("stsb")
    return {
        "train": write_tsv_slice(shared_path("glue", "STS-B", "train.tsv"), directory / "train.tsv", 320),
        "dev": write_tsv_slice(shared_path("glue", "STS-B", "dev.tsv"), directory / "dev.tsv", 120),
    }


def test_regression_metrics_match_hand_computed_values():
    from tfsft.tasks.regression import regression_metrics

    targets = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    predictions = np.array([[1.5], [1.0], [3.5], [4.0], [6.0]])
    metrics, report = regression_metrics(targets, predictions, LabelMap(("score",)))
    # squared errors .25, 1, .25, 0, 1 -> 2.5 / 5
    assert metrics["eval_mse"] == pytest.approx(0.5) and metrics["eval_loss"] == pytest.approx(0.5)
    # prediction ranks 2,1,3,4,5 vs 1..5: sum d^2 = 2, rho = 1 - 6*2 / (5*24)
    assert metrics["eval_spearman"] == pytest.approx(0.9)
    # centred targets -2..2, centred predictions -1.7,-2.2,.3,.8,2.8: 12 / sqrt(10 * 16.3)
    assert metrics["eval_pearson"] == pytest.approx(12 / np.sqrt(163))
    assert metrics["eval_samples"] == 5
    assert report["predictions"]["mean"] == pytest.approx(3.2)
    constant, _ = regression_metrics(targets, np.full((5, 1), 2.0), LabelMap(("score",)))
    assert constant["eval_spearman"] == 0.0 and constant["eval_pearson"] == 0.0


def test_regression_config_defaults_and_rejects_classification_metric():
    config = RunConfig.from_flat({"task": "regression"})
    assert config.train.metric_for_best_model == "spearman"
    assert RunConfig().train.metric_for_best_model == "accuracy"
    with pytest.raises(ConfigError, match="metric_for_best_model.*for --task regression"):
        RunConfig.from_flat({"task": "regression", "metric_for_best_model": "accuracy"})
    with pytest.raises(ConfigError, match="for --task classification"):
        RunConfig.from_flat({"metric_for_best_model": "spearman"})


def test_non_numeric_target_names_file_and_row(tmp_path, stsb_slices):
    lines = stsb_slices["train"].read_text(encoding="utf-8").splitlines()[:6]
    fields = lines[3].split("\t")
    fields[-1] = "high"
    lines[3] = "\t".join(fields)
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = RunConfig.from_flat({"task": "regression", "label_column": "score"})
    examples = read_examples(str(bad), config.data)
    with pytest.raises(DataError, match=r"bad.tsv: row 4: regression target 'high' is not a finite number"):
        encode_targets(examples)
    result = run_script(
        "finetune.py", "--task", "regression", "--train_file", str(bad), "--label_column", "score",
        "--output_dir", str(tmp_path / "out"), timeout=300,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
    assert "bad.tsv: row 4: regression target 'high'" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory, tiny_checkpoint, stsb_slices):
    from tfsft import finetune

    output_dir = tmp_path_factory.mktemp("regression") / "run"
    config = RunConfig.from_flat(dict(
        task="regression", model_name_or_path=str(tiny_checkpoint), train_file=str(stsb_slices["train"]),
        validation_file=str(stsb_slices["dev"]), label_column="score", num_train_epochs=3, learning_rate=2e-3,
        warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64, output_dir=str(output_dir),
        export=True, quantize_int8=True,
    ))
    return finetune(config, verbose=0)


def test_regression_trains_and_keeps_best_spearman_epoch(regression_run):
    metrics, out = regression_run.metrics, regression_run.run_dir
    for key in ("eval_pearson", "eval_spearman", "eval_mse", "eval_loss"):
        assert isinstance(metrics[key], float), key
    assert "eval_accuracy" not in metrics
    assert metrics["newly_initialized"] == ["classifier"]
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    lines = (out / "history.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, row.split(",")))) for row in lines[1:]]
    assert len(rows) == 3 and {"val_spearman", "val_pearson", "val_mse", "val_loss"} <= set(rows[0])
    assert metrics["eval_spearman"] == pytest.approx(max(r["val_spearman"] for r in rows), abs=1e-6)
    assert (out / "eval_report.json").is_file() and not (out / "confusion_matrix.png").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval_spearman"] == metrics["eval_spearman"]


def test_regression_export_predictor_and_server(regression_run, stsb_slices):
    from starlette.testclient import TestClient

    from tfsft.evaluation import predict_logits
    from tfsft.inference import Predictor, Score
    from tfsft.serving import create_app

    out = regression_run.run_dir
    report = json.loads((out / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    assert set(report["parity"]) == {artifacts.BUNDLE_MODEL_FUSED, artifacts.BUNDLE_MODEL_INT8}
    for batch in ("batch_1", "batch_8"):
        assert report["parity"][artifacts.BUNDLE_MODEL_FUSED][batch]["max_abs_logit_diff"] < 1e-4
    assert "keras_spearman" in report and "spearman_drop" in report["int8"]
    meta = json.loads((out / "onnx" / artifacts.BUNDLE_FILE).read_text())
    assert meta["task"] == "regression" and meta["labels"] == ["score"]

    predictor = Predictor(out / "onnx")
    examples = read_examples(str(stsb_slices["dev"]), RunConfig.from_flat({"label_column": "score"}).data)
    pairs = list(zip(examples.texts[:5], examples.pairs[:5]))
    predictions = predictor.predict(pairs)
    assert all(isinstance(p, Score) for p in predictions)

    from tfsft.data import LengthBatchedData
    from tfsft.modeling import feature_names, load_finetuned, load_tokenizer, text_encoder

    model = load_finetuned(out / "model")
    encoder = text_encoder(load_tokenizer(out / "model"), 64)
    data = LengthBatchedData(encoder.encode(examples.texts[:5], examples.pairs[:5]), None, 8, shuffle=False,
                             pad_id=encoder.pad_id, feature_names=feature_names(model))
    np.testing.assert_allclose([p.score for p in predictions], predict_logits(model, data)[:, 0], atol=1e-4)

    with TestClient(create_app(predictor)) as client:
        response = client.post("/predict", json={"pairs": [list(pairs[0])]})
        assert response.status_code == 200
        assert response.json()["predictions"][0]["score"] == pytest.approx(predictions[0].score, abs=1e-6)
        assert client.get("/metadata").json()["task"] == "regression"


def test_regression_run_reevaluates_with_its_task(regression_run, stsb_slices):
    from tfsft.pipeline import evaluate_run

    metrics = evaluate_run(str(regression_run.run_dir), str(stsb_slices["dev"]))
    assert metrics["eval_spearman"] == pytest.approx(regression_run.metrics["eval_spearman"], abs=1e-5)
    assert metrics["eval_mse"] == pytest.approx(regression_run.metrics["eval_mse"], abs=1e-4)


def test_pair_classification_keeps_the_epoch_with_the_best_validation_f1(tiny_checkpoint, mrpc_slices, tmp_path):
    from tfsft import finetune

    result = finetune(RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(mrpc_slices["train"]),
        validation_file=str(mrpc_slices["test"]), text_column="#1 String", text_pair_column="#2 String",
        label_column="Quality", num_train_epochs=3, learning_rate=2e-3, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, metric_for_best_model="f1",
        output_dir=str(tmp_path / "run"), export=False,
    )), verbose=0)
    lines = (result.run_dir / "history.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, row.split(",")))) for row in lines[1:]]
    assert len(rows) == 3 and {"val_f1", "val_mcc", "val_accuracy", "val_loss"} <= set(rows[0])
    assert result.metrics["eval_f1"] == pytest.approx(max(r["val_f1"] for r in rows), abs=1e-6)


def test_f1_as_best_model_metric_needs_two_labels(tiny_checkpoint, tmp_path):
    from conftest import write_csv
    from tfsft import finetune

    rows = [[f"text number {i}", "abc"[i % 3]] for i in range(30)]
    data = write_csv(tmp_path / "three.csv", ["text", "label"], rows)
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(data), metric_for_best_model="f1",
        num_train_epochs=2, output_dir=str(tmp_path / "run"), export=False,
    ))
    with pytest.raises(ConfigError, match="has 3: use f1_macro"):
        finetune(config, verbose=0)
    assert not (tmp_path / "run").exists()


def test_class_weights_balanced_and_explicit():
    from tfsft.data import class_weights

    label_map = LabelMap(("neg", "pos"))
    ids = np.array([0, 0, 0, 1])
    # 4 examples / (2 classes * 3 negatives), 4 / (2 * 1 positive)
    np.testing.assert_allclose(class_weights("balanced", label_map, ids), [4 / 6, 2.0])
    np.testing.assert_allclose(class_weights({"pos": 3.0}, label_map, ids), [1.0, 3.0])
    with pytest.raises(DataError, match=r"--class_weights names label\(s\) \['positive'\]"):
        class_weights({"positive": 3.0}, label_map, ids)
    with pytest.raises(ConfigError, match="class_weights"):
        RunConfig.from_flat({"class_weights": "pos=0"})


def test_class_weights_reach_the_loss(tiny_checkpoint, sst2_slices, tmp_path):
    """On a 5:1 imbalanced slice, balanced weights undo the learned prior: on the balanced dev set
    the weighted model's loss is lower (the unweighted one is confidently positive); weights of 1
    change nothing."""
    from tfsft import finetune

    lines = sst2_slices["train"].read_text(encoding="utf-8").splitlines()
    positives = [line for line in lines[1:] if line.endswith("\t1")][:200]
    negatives = [line for line in lines[1:] if line.endswith("\t0")][:40]
    train = tmp_path / "imbalanced.tsv"
    train.write_text("\n".join([lines[0], *positives, *negatives]) + "\n", encoding="utf-8")

    def run(name, **overrides):
        config = RunConfig.from_flat(dict(
            model_name_or_path=str(tiny_checkpoint), train_file=str(train), validation_file=str(sst2_slices["dev"]),
            num_train_epochs=2, learning_rate=2e-3, warmup_ratio=0.0, per_device_train_batch_size=16,
            max_seq_length=64, output_dir=str(tmp_path / name), export=False, **overrides,
        ))
        return finetune(config, verbose=0).metrics

    plain = run("plain")
    ones = run("ones", class_weights="0=1,1=1")
    balanced = run("balanced", class_weights="balanced")
    assert ones["eval_loss"] == plain["eval_loss"] and ones["class_weights"] == {"0": 1.0, "1": 1.0}
    assert balanced["class_weights"] == {"0": pytest.approx(3.0), "1": pytest.approx(0.6)}
    assert balanced["eval_loss"] < plain["eval_loss"] - 0.05


NEGATIONS = {"not", "no", "never", "nothing", "n't", "none", "nor", "neither", "without"}


def sst2_label_sets(path, rows):
    """(sentence, labels) from SST-2 rows: the sentiment, plus `negation` when the sentence has a negation word."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines()[1 : 1 + rows]:
        sentence, label = line.rsplit("\t", 1)
        labels = ["positive" if label == "1" else "negative"]
        if NEGATIONS & set(sentence.lower().replace("n't", " n't").split()):
            labels.append("negation")
        out.append((sentence, labels))
    return out


@pytest.fixture(scope="module")
def multilabel_files(tmp_path_factory, sst2_slices):
    """Training labels as JSONL lists, validation labels as `|`-delimited CSV cells."""
    from conftest import write_csv

    directory = tmp_path_factory.mktemp("multilabel")
    train = directory / "train.jsonl"
    train.write_text("".join(json.dumps({"text": t, "labels": ls}) + "\n" for t, ls in sst2_label_sets(sst2_slices["train"], 400)))
    dev_rows = sst2_label_sets(sst2_slices["dev"], 200)
    assert 20 < sum("negation" in ls for _, ls in dev_rows) < 180
    dev = write_csv(directory / "dev.csv", ["text", "labels"], [[t, "|".join(ls)] for t, ls in dev_rows])
    return {"train": train, "dev": dev}


def test_multilabel_metrics_match_hand_computed_values():
    from tfsft.tasks.multilabel import multilabel_metrics

    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    logits = np.array([[2, -2, -1], [-3, 1, 0.5], [1, 3, -2], [-1, -1, -1]], dtype=np.float32)
    label_map = LabelMap(("a", "b", "c"))
    metrics, report = multilabel_metrics(labels, logits, label_map, threshold=0.5)
    # at 0.5: a and b right everywhere (F1 1, 1), c: 1 false positive, 2 misses (F1 0); micro TP 4, FP 1, FN 2
    assert metrics["eval_f1_micro"] == pytest.approx(8 / 11)
    assert metrics["eval_f1_macro"] == pytest.approx(2 / 3)
    assert metrics["eval_exact_match"] == pytest.approx(0.25)
    assert report["per_label"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert metrics["eval_loss"] == pytest.approx(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))
    # tuned: p(-1) = 0.269 counts from 0.15 to 0.25 (TP 6, FP 3: F1 0.8); 0.65-0.70 ties, the lowest wins
    tuned, tuned_report = multilabel_metrics(labels, logits, label_map)
    assert tuned["eval_threshold"] == 0.15 and tuned_report["decision"] == {"threshold": 0.15}
    assert tuned["eval_f1_micro_in_sample"] == pytest.approx(0.8)  # scored on the labels that chose it


def test_multilabel_label_parsing_and_bad_labels(tmp_path):
    from tfsft.data import encode_labels, task_label_map
    from tfsft.tasks.multilabel import label_set

    assert label_set('["b", "a", "b"]', "|", "f", 1) == ["b", "a"]
    assert label_set("a; b", ";", "f", 1) == ["a", "b"]
    assert label_set("[]", "|", "f", 1) == []
    with pytest.raises(DataError, match=r"f: row 7: empty label name in 'a\|\|b'"):
        label_set("a||b", "|", "f", 7)
    with pytest.raises(DataError, match="row 3: label .* is not a JSON list"):
        label_set('["a", {"b": 1}]', "|", "f", 3)
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "x", "labels": ["a", "b"]}\n{"text": "y", "labels": []}\n{"text": "z", "labels": ["a"]}\n')
    config = RunConfig.from_flat({"task": "multilabel", "label_column": "labels"})
    examples = read_examples(str(train), config.data)
    label_map = task_label_map("multilabel", examples)
    np.testing.assert_array_equal(encode_labels("multilabel", label_map, examples), [[1, 1], [0, 0], [1, 0]])
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "x", "labels": ["a"]}\n{"text": "y", "labels": ["c"]}\n')
    with pytest.raises(DataError, match=r"dev.jsonl: row 2: label 'c' never appears in the training data"):
        encode_labels("multilabel", label_map, read_examples(str(dev), config.data))
    with pytest.raises(DataError, match=r"row 1: label \[.*\] is a list; several labels per example need --task multilabel"):
        task_label_map("classification", examples)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory, tiny_checkpoint, multilabel_files):
    from tfsft import finetune

    output_dir = tmp_path_factory.mktemp("multilabel-run") / "run"
    config = RunConfig.from_flat(dict(
        task="multilabel", model_name_or_path=str(tiny_checkpoint), train_file=str(multilabel_files["train"]),
        validation_file=str(multilabel_files["dev"]), label_column="labels", num_train_epochs=3, learning_rate=2e-3,
        warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64, output_dir=str(output_dir), export=True,
    ))
    return finetune(config, verbose=0)


def test_multilabel_trains_tunes_threshold_and_serves(multilabel_run, multilabel_files):
    from starlette.testclient import TestClient

    from tfsft.evaluation import predict_logits
    from tfsft.tasks.multilabel import THRESHOLDS
    from tfsft.inference import LabelSet, Predictor
    from tfsft.serving import create_app

    metrics, out = multilabel_run.metrics, multilabel_run.run_dir
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    assert metrics["eval_threshold"] in THRESHOLDS
    lines = (out / "history.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), map(float, row.split(",")))) for row in lines[1:]]
    assert {"val_f1_micro", "val_f1_macro", "val_threshold"} <= set(rows[0])
    assert metrics["eval_f1_micro"] == pytest.approx(max(r["val_f1_micro"] for r in rows), abs=1e-6)
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report["per_label"]) == {"negation", "negative", "positive"}

    meta = json.loads((out / "onnx" / artifacts.BUNDLE_FILE).read_text())
    assert meta["task"] == "multilabel" and meta["decision"] == {"threshold": metrics["eval_threshold"]}
    export_report = json.loads((out / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    assert export_report["parity"][artifacts.BUNDLE_MODEL_FUSED]["batch_8"]["max_abs_logit_diff"] < 1e-4
    assert "keras_f1_micro" in export_report

    predictor = Predictor(out / "onnx")
    config = RunConfig.from_flat({"task": "multilabel", "label_column": "labels"})
    texts = read_examples(str(multilabel_files["dev"]), config.data).texts[:6]
    predictions = predictor.predict(texts)
    assert all(isinstance(p, LabelSet) for p in predictions)

    from tfsft.data import LengthBatchedData
    from tfsft.modeling import feature_names, load_finetuned, load_tokenizer, text_encoder

    model = load_finetuned(out / "model")
    encoder = text_encoder(load_tokenizer(out / "model"), 64)
    data = LengthBatchedData(encoder.encode(texts), None, 8, shuffle=False, pad_id=encoder.pad_id, feature_names=feature_names(model))
    expected = 1 / (1 + np.exp(-predict_logits(model, data)))
    got = np.array([[p.probabilities[name] for name in predictor.labels] for p in predictions])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    for prediction, row in zip(predictions, got):
        assert prediction.labels == [n for n, p in zip(predictor.labels, row) if p >= metrics["eval_threshold"]]
    with TestClient(create_app(predictor)) as client:
        body = client.post("/predict", json={"texts": texts[:2]}).json()
        assert body["predictions"][0] == json.loads(json.dumps(predictions[0].to_dict()))


@pytest.fixture(scope="module")
def conll_slices(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conll")
    return {
        "train": write_conll_slice(shared_path("conll2003", "train.txt"), directory / "train.txt", 300),
        "dev": write_conll_slice(shared_path("conll2003", "dev.txt"), directory / "dev.txt", 80),
    }


def test_conll_and_jsonl_token_files(tmp_path, conll_slices):
    from tfsft.data import encode_labels, task_label_map
    from tfsft.tasks.ner import read_token_examples

    config = RunConfig.from_flat({"task": "ner", "train_file": str(conll_slices["train"])}).data
    train = read_token_examples(str(conll_slices["train"]), config)
    assert len(train) == 300
    assert train.words[0] == ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]
    assert train.labels[0] == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert train.rows[:2] == [1, 11]
    small = tmp_path / "small.conll"
    small.write_text("-DOCSTART- -X- -X- O\n\nPeter NNP B-PER\nlives VBZ O\n\n\nParis NNP B-LOC\n")
    parsed = read_token_examples(str(small), config)
    assert parsed.words == [["Peter", "lives"], ["Paris"]] and parsed.rows == [3, 7]
    small.write_text("Peter NNP B-PER\nlives\n")
    with pytest.raises(DataError, match=r"small.conll: row 2: expected 'token ... tag'"):
        read_token_examples(str(small), config)
    label_map = task_label_map("ner", train)
    assert set(label_map.names) == {"O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"}
    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_text('{"tokens": ["Peter", "lives"], "tags": ["B-PER", "O"]}\n{"tokens": ["Paris"], "tags": ["B-LOC", "O"]}\n')
    with pytest.raises(DataError, match=r"tags.jsonl: row 2: 1 tokens but 2 tags"):
        read_token_examples(str(jsonl), config)
    jsonl.write_text('{"tokens": ["Peter", "lives"], "tags": ["B-PER", "O"]}\n{"tokens": ["Paris"], "tags": ["B-CITY"]}\n')
    with pytest.raises(DataError, match=r"tags.jsonl: row 2: tag 'B-CITY' never appears in the training data"):
        encode_labels("ner", label_map, read_token_examples(str(jsonl), config))
    with pytest.raises(ConfigError, match="train_file"):
        RunConfig.from_flat({"task": "ner"})


def test_labels_go_to_the_first_word_piece_only(tiny_checkpoint):
    from tfsft.data import IGNORED_LABEL
    from tfsft.tasks.ner import TokenExamples
    from tfsft.modeling import load_tokenizer, text_encoder

    encoder = text_encoder(load_tokenizer(tiny_checkpoint), 32)
    examples = TokenExamples([["Germanophile", "EU"]], [["B-MISC", "B-ORG"]], [1], "x")
    encoded, labels = examples.encode(encoder, np.array([np.array([3, 5], dtype=np.int32)], dtype=object))
    pieces = len(encoded.input_ids[0])
    assert pieces > 4  # [CLS] Germanophile (several pieces) EU [SEP]
    expected = np.full(pieces, IGNORED_LABEL)
    expected[1], expected[pieces - 2] = 3, 5
    np.testing.assert_array_equal(labels[0], expected)


def test_entity_metrics_match_hand_counted_spans():
    from tfsft.tasks.ner import ner_metrics

    label_map = LabelMap(("B-LOC", "B-ORG", "B-PER", "I-PER", "O"))
    ids = label_map.ids
    # sentence 1: PER right, LOC predicted as ORG; sentence 2: ORG right. Ignored positions carry
    # wrong predictions on purpose: they must not count.
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    labels = np.empty(2, dtype=object)
    logits = np.zeros((2, 6, len(label_map.names)), dtype=np.float32)
    for i, (gold, guess) in enumerate(zip(true, predicted)):
        positions = [1, 2, 3, 4][: len(gold)]
        labels[i] = np.full(6 if i == 0 else 4, -100, dtype=np.int32)
        logits[i, :, ids["B-PER"]] = 5.0  # what the ignored positions predict
        for position, g, p in zip(positions, gold, guess):
            labels[i][position] = ids[g]
            logits[i, position] = 0.0
            logits[i, position, ids[p]] = 5.0
    metrics, report = ner_metrics(labels, logits, label_map)
    # entities: true {PER, LOC, ORG}, predicted {PER, ORG(wrong), ORG}: 2 of 3 right each way
    assert metrics["eval_precision"] == pytest.approx(2 / 3)
    assert metrics["eval_recall"] == pytest.approx(2 / 3)
    assert metrics["eval_f1"] == pytest.approx(2 / 3)
    assert metrics["eval_token_accuracy"] == pytest.approx(5 / 6)
    assert report["entities"]["LOC"]["recall"] == 0.0 and report["entities"]["PER"]["f1-score"] == 1.0


def test_entity_spans_have_offsets_in_the_original_text():
    from tfsft.tasks.ner import entity_spans

    text = "  Peter  Blackburn went to\tNew York ."
    words = [(m.group(), m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "O"]
    spans = entity_spans(text, words, tags, [0.9, 0.7, 0.9, 0.9, 0.8, 0.6, 0.9])
    assert [(s["entity"], s["start"], s["end"], s["text"]) for s in spans] == [
        ("PER", 2, 18, "Peter  Blackburn"), ("LOC", 27, 35, "New York")
    ]
    assert spans[0]["score"] == pytest.approx(0.8)
    # IOB1 style: an I- tag after O (or after another type) opens an entity
    assert [s["text"] for s in entity_spans(text, words, ["I-PER", "I-LOC", "O", "O", "I-LOC", "I-LOC", "O"], [1.0] * 7)] == [
        "Peter", "Blackburn", "New York"
    ]


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, tiny_checkpoint, conll_slices):
    from tfsft import finetune

    output_dir = tmp_path_factory.mktemp("ner-run") / "run"
    config = RunConfig.from_flat(dict(
        task="ner", model_name_or_path=str(tiny_checkpoint), train_file=str(conll_slices["train"]),
        validation_file=str(conll_slices["dev"]), num_train_epochs=5, learning_rate=1e-2, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, output_dir=str(output_dir), export=True,
    ))
    return finetune(config, verbose=0)


@pytest.mark.slow
def test_ner_trains_exports_and_predicts_spans(ner_run, conll_slices):
    from seqeval.metrics import f1_score, precision_score, recall_score

    from tfsft.data import LengthBatchedData, encode_labels
    from tfsft.tasks.ner import read_token_examples
    from tfsft.evaluation import predict_logits
    from tfsft.inference import Entities, Predictor, softmax
    from tfsft.tasks.ner import entity_spans, token_tags, word_tags
    from tfsft.modeling import load_finetuned, load_tokenizer, text_encoder
    from tfsft.tokenize import split_words

    metrics, out = ner_run.metrics, ner_run.run_dir
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    lines = (out / "history.csv").read_text().splitlines()
    assert {"val_f1", "val_precision", "val_recall"} <= set(lines[0].split(","))
    # The reported scores are the saved model's, scored by seqeval on the dev words' first pieces;
    # the tiny model finds some entities (an all-O tagger scores F1 0). Its token accuracy is
    # barely above the share of O, so it is checked by recomputing it, not by a bound.
    config = RunConfig.from_flat({"task": "ner", "train_file": str(conll_slices["dev"])}).data
    dev = read_token_examples(str(conll_slices["dev"]), config)
    keras_model = load_finetuned(out / "model", "ner")
    label_map = LabelMap(tuple(keras_model.config.id2label[i] for i in range(keras_model.config.num_labels)))
    dev_encoder = text_encoder(load_tokenizer(out / "model"), 64)
    encoded, dev_labels = dev.encode(dev_encoder, encode_labels("ner", label_map, dev))
    dev_data = LengthBatchedData(encoded, None, 8, shuffle=False, pad_id=dev_encoder.pad_id)
    true, predicted = token_tags(dev_labels, predict_logits(keras_model, dev_data), label_map)
    pairs = [(t, p) for gold, guess in zip(true, predicted) for t, p in zip(gold, guess)]
    assert all(gold == tags[: len(gold)] for gold, tags in zip(true, dev.labels))
    assert metrics["eval_f1"] == pytest.approx(f1_score(true, predicted), abs=1e-6) and metrics["eval_f1"] > 0.0
    assert metrics["eval_precision"] == pytest.approx(precision_score(true, predicted), abs=1e-6)
    assert metrics["eval_recall"] == pytest.approx(recall_score(true, predicted), abs=1e-6)
    assert metrics["eval_token_accuracy"] == pytest.approx(np.mean([t == p for t, p in pairs]), abs=1e-6)

    report = json.loads((out / "onnx" / artifacts.BUNDLE_REPORT).read_text())
    for batch in ("batch_1", "batch_8"):
        assert report["parity"][artifacts.BUNDLE_MODEL_FUSED][batch]["max_abs_logit_diff"] < 1e-4
        assert report["parity"][artifacts.BUNDLE_MODEL_FUSED][batch]["label_agreement"] == 1.0
    assert "keras_f1" in report

    predictor = Predictor(out / "onnx")
    sentences = [" ".join(words) for words in dev.words[:8]]
    predictions = predictor.predict(sentences)
    assert len(predictions) == 8 and all(isinstance(p, Entities) for p in predictions)

    words = [split_words(s) for s in sentences]
    encoded, word_ids = dev_encoder.encode_words([[w for w, _, _ in ws] for ws in words])
    data = LengthBatchedData(encoded, None, 8, shuffle=False, pad_id=dev_encoder.pad_id)
    probabilities = softmax(predict_logits(keras_model, data))
    assert sum(len(p.entities) for p in predictions) > 0  # the loops below check spans, not nothing
    for i, prediction in enumerate(predictions):
        tags, scores = word_tags(probabilities[i], word_ids[i], len(words[i]), predictor.labels)
        expected = entity_spans(sentences[i], words[i], tags, scores)
        assert [(e["entity"], e["start"], e["end"]) for e in prediction.entities] == [(e["entity"], e["start"], e["end"]) for e in expected]
        assert not prediction.truncated
        for entity in prediction.entities:
            assert sentences[i][entity["start"] : entity["end"]] == entity["text"]
    with pytest.raises(ValueError, match="single texts"):
        predictor.predict([("a", "b")])

    from starlette.testclient import TestClient

    from tfsft.serving import create_app

    with TestClient(create_app(predictor)) as client:
        body = client.post("/predict", json={"texts": sentences[:2]}).json()
        assert body["predictions"] == [json.loads(json.dumps(p.to_dict())) for p in predictions[:2]]
        rejected = client.post("/predict", json={"pairs": [["a", "b"]]})
        assert rejected.status_code == 400 and "send \"texts\"" in rejected.json()["error"]


def test_search_keeps_the_best_validation_trial_and_tests_only_it(tiny_checkpoint, sst2_slices, tmp_path):
    import csv

    from tfsft.config import search_trials
    from tfsft.search import run_search

    test_file = write_tsv_slice(shared_path("glue", "SST-2", "dev.tsv"), tmp_path / "heldout.tsv", 100, start=600)
    trials = search_trials(dict(
        search=True, learning_rate="1e-5,2e-3", num_train_epochs="1,2", model_name_or_path=str(tiny_checkpoint),
        train_file=str(sst2_slices["train"]), validation_file=str(sst2_slices["dev"]), test_file=str(test_file),
        warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=64, output_dir=str(tmp_path / "search"),
        quantize_int8=False,
    ))
    assert [(t.train.learning_rate, t.train.num_train_epochs) for t in trials] == [(1e-5, 1), (1e-5, 2), (2e-3, 1), (2e-3, 2)]
    result = run_search(trials, verbose=0)
    out = tmp_path / "search"
    summary = json.loads((out / "search.json").read_text())
    with open(out / "search.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 == len(summary["trials"])
    scores = [float(r["score"]) for r in rows]
    assert summary["metric"] == "eval_accuracy" and summary["best"]["score"] == max(scores)
    assert [float(r["eval_accuracy"]) for r in rows] == scores
    best_dir = Path(summary["best"]["run_dir"])
    for row in summary["trials"]:
        run = out / row["trial"]
        saved = json.loads((run / "config.json").read_text())
        assert saved["data"]["test_file"] is None and saved["train"]["learning_rate"] == row["learning_rate"]
        assert (run / "evaluations" / "heldout" / "metrics.json").exists() == (run == best_dir)
        assert (run / "onnx").exists() == (run == best_dir)
    assert result.test_metrics["test_samples"] == 100 and "test_accuracy" in result.test_metrics
    with pytest.raises(ConfigError, match="not empty"):
        run_search(trials, verbose=0)


def test_benchmark_script_writes_a_results_table(tiny_checkpoint, tmp_path):
    shared_path("glue", "STS-B", "train.tsv")
    bad = run_script("benchmark.py", "--tasks", "stsb,imdb", timeout=120)
    assert bad.returncode == 2 and "error: --tasks must name some of" in bad.stderr
    earlier = [  # rows of an earlier run into the same table: conll is kept, the stale stsb replaced
        dict(task="conll", command="python scripts/benchmark.py --tasks conll", metric="CoNLL-2003 test entity F1",
             score=0.5, train_samples=10, schedule="1, 0.001", best_epoch="last", examples_per_s=1.0, wall_s=1.0,
             int8="n/a", keras="f1 0.5"),
        dict(task="stsb", command="stale", metric="STS-B dev Spearman", score=0.1, train_samples=1, schedule="1, 1",
             best_epoch="last", examples_per_s=1.0, wall_s=1.0, int8="n/a", keras="n/a"),
    ]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps(earlier))
    result = run_script(  # mrpc starts from the stsb run, which is made first
        "benchmark.py", "--model_name_or_path", str(tiny_checkpoint), "--tasks", "mrpc",
        "--max_train_samples", "60", "--max_eval_samples", "24", "--num_train_epochs", "2",
        "--learning_rate", "2e-3", "--max_seq_length", "48", "--output_dir", str(tmp_path / "bench"), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "bench" / "results.md").read_text().splitlines()
    assert table[0].startswith("| task | metric | score | train examples | epochs, lr | best epoch | train examples/s |")
    assert [row.split("|")[1].strip() for row in table[2:5]] == ["mrpc", "stsb", "conll"] and table[5] == ""
    assert table[6].startswith("- mrpc: `python scripts/benchmark.py --model_name_or_path")
    assert table[8] == "- conll: `python scripts/benchmark.py --tasks conll`"
    mrpc_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert mrpc_cells[1] == "MRPC test F1" and mrpc_cells[4] == "2, 0.002, from the stsb run"
    assert mrpc_cells[5].startswith(("1 (f1: ", "2 (f1: "))
    mrpc_config = json.loads((tmp_path / "bench" / "mrpc" / "config.json").read_text())
    assert mrpc_config["model"]["model_name_or_path"] == str(tmp_path / "bench" / "stsb" / "model")
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[:2] == ["stsb", "STS-B dev Spearman"] and cells[4] == "2, 0.002"
    run_dir = tmp_path / "bench" / "stsb"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # dev is the test split, scored once; the best epoch was chosen on a held-out slice of train
    assert metrics["test_samples"] == 24 and metrics["eval_samples"] <= 24
    assert float(cells[2]) == pytest.approx(metrics["test_spearman"], abs=1e-4)
    assert int(cells[3]) == metrics["train_samples"] == 60
    history = (run_dir / "history.csv").read_text().splitlines()
    spearman = [float(row.split(",")[history[0].split(",").index("val_spearman")]) for row in history[1:]]
    assert cells[5].startswith(f"{spearman.index(max(spearman)) + 1} (spearman: ")
    assert cells[8].startswith("spearman ")


# ------------------------------------------------------------------------------- the registry


def test_every_task_defines_each_stage():
    """A registered task overrides what has no sensible default: labels, loss, metrics and what
    the Predictor answers; its best-model metrics include the loss (a language model's first)."""
    from tfsft.tasks import TASKS, Task

    assert list(TASKS) == ["classification", "regression", "multilabel", "ner", "qa", "causal_lm", "seq2seq"]
    for name, task in TASKS.items():
        assert task.name == name and task.summary, name
        for method in ("label_map", "encode_labels", "objective", "metrics"):
            assert getattr(type(task), method) is not getattr(Task, method), (name, method)
        assert type(task).decode is not Task.decode or type(task).predict is not Task.predict, name
        assert "loss" in task.best_metrics and (task.best_metrics[0] != "loss" or task.generates), name  # an LM's main metric is its loss
        assert task.keras_metrics <= set(task.best_metrics), name


def test_unknown_task_names_the_known_ones():
    from tfsft.tasks import TASKS, get_task

    with pytest.raises(ConfigError, match="must be one of") as caught:
        get_task("sentiment")
    assert all(name in str(caught.value) for name in TASKS)
    with pytest.raises(ConfigError, match="task"):
        RunConfig.from_dict({"model": {"task": "sentiment"}})


def test_no_stage_switches_on_task_names():
    """Outside tfsft/tasks/, a task name appears only as a default value: never compared with, in a
    set, or as a dict key (a table per task is what the registry replaced)."""
    import ast

    from tfsft.tasks import TASKS

    root = Path(__file__).resolve().parent.parent / "tfsft"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "tasks" in path.relative_to(root).parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list = []
            if isinstance(node, ast.Compare):
                names = [node.left, *node.comparators]
            elif isinstance(node, ast.Dict):
                names = [key for key in node.keys if key is not None]
            elif isinstance(node, (ast.Set, ast.Tuple, ast.List)):
                names = list(node.elts)
            for item in names:
                if isinstance(item, ast.Constant) and item.value in TASKS:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}: {item.value!r}")
    assert not offenders, offenders
