"""Few labels (--few_shot): pair sampling, the contrastive loss, the `auto` switch, the logistic
head, pseudo-label selection, unlabelled files, and whole runs of the tiny BERT."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tfsft.config import RunConfig
from tfsft.errors import ConfigError, DataError
from tfsft.few_shot import (
    class_counts,
    head_probabilities,
    logistic_head,
    resolve_few_shot,
    sample_pairs,
    select_pseudo_labels,
)

from conftest import write_csv


# ------------------------------------------------------------------------------------- pairs


def test_pairs_balanced_per_example_and_never_self():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pairs = sample_pairs(labels, 6, seed=3)
    assert len(pairs) == len(labels) * 6
    assert not np.any(pairs.first == pairs.second)
    same = labels[pairs.first] == labels[pairs.second]
    np.testing.assert_array_equal(pairs.targets, same.astype(np.float32))
    for i in range(len(labels)):
        mine = pairs.first == i
        assert int(pairs.targets[mine].sum()) == 3  # half of the pairs same-class
        assert int((pairs.targets[mine] == 0).sum()) == 3


def test_pairs_are_seeded():
    labels = np.array([0, 1] * 10)
    a, b, c = sample_pairs(labels, 4, seed=1), sample_pairs(labels, 4, seed=1), sample_pairs(labels, 4, seed=2)
    np.testing.assert_array_equal(a.first, b.first)
    np.testing.assert_array_equal(a.second, b.second)
    assert not np.array_equal(a.second, c.second)


def test_pairs_odd_count_and_singleton_class():
    labels = np.array([0, 0, 0, 1])  # class 1 has one example: it gets no same-class partner
    pairs = sample_pairs(labels, 3, seed=0)
    lone = pairs.first == 3
    assert pairs.targets[lone].tolist() == [0.0]  # floor(3/2) = 1 negative, no positive
    assert Counter(pairs.targets[pairs.first == 0].tolist()) == {1.0: 2, 0.0: 1}


def test_multilabel_pairs_share_a_label_or_none():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    pairs = sample_pairs(labels, 4, seed=0)
    shares = (labels[pairs.first] * labels[pairs.second]).sum(axis=1) > 0
    np.testing.assert_array_equal(pairs.targets, shares.astype(np.float32))
    assert not np.any(pairs.first == pairs.second)


def test_pairs_need_two_examples():
    with pytest.raises(ConfigError, match="no sentence pairs"):
        sample_pairs(np.array([0]), 4, seed=0)


# ------------------------------------------------------------------------------------ auto


def _config(**flags) -> RunConfig:
    return RunConfig.from_flat({"train_file": "x.csv", **flags})


@pytest.mark.parametrize(
    "flags, counts, pooling, expected",
    [
        ({}, [16, 40], "mean", True),
        ({}, [64, 500], "mean", True),
        ({}, [65, 500], "mean", False),
        ({}, [16, 16], "cls", False),  # not a sentence encoder: plain fine-tuning unless forced
        ({"few_shot": "on"}, [500, 500], "cls", True),
        ({"few_shot": "off"}, [8, 8], "mean", False),
        ({"task": "regression"}, [8, 8], "mean", False),
    ],
)
def test_auto_switch(flags, counts, pooling, expected):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    on, why = resolve_few_shot(_config(**flags), labels, len(counts), pooling)
    assert on is expected
    assert why.startswith("--few_shot")


def test_auto_counts_multilabel_by_label():
    labels = np.array([[1, 0]] * 100 + [[1, 1]] * 10)
    np.testing.assert_array_equal(class_counts(labels, 2), [110, 10])
    assert resolve_few_shot(_config(task="multilabel"), labels, 2, "mean")[0] is True


def test_config_refuses_what_few_shot_cannot_do():
    with pytest.raises(ConfigError, match="few_shot"):
        _config(few_shot="sometimes")
    with pytest.raises(ConfigError, match="--task ner"):
        RunConfig.from_flat({"train_file": "x.conll", "task": "ner", "few_shot": "on"})
    with pytest.raises(ConfigError, match="unlabeled_file"):
        _config(few_shot="off", unlabeled_file="u.txt")
    with pytest.raises(ConfigError, match="pseudo_label_threshold"):
        _config(pseudo_label_threshold=1.0)
    assert _config().train.few_shot == "auto"


# -------------------------------------------------------------------------------- pseudo-labels


def test_pseudo_labels_balanced_confident_and_capped():
    probabilities = np.array([
        [0.99, 0.01], [0.95, 0.05], [0.97, 0.03], [0.6, 0.4],  # class 0: three confident
        [0.02, 0.98], [0.08, 0.92], [0.3, 0.7],                # class 1: two confident
    ])
    chosen = select_pseudo_labels(probabilities, 0.9, per_class=10)
    assert chosen.added == {0: 2, 1: 2}  # balanced to the class with the fewest confident
    assert chosen.indices.tolist() == [0, 2, 4, 5]  # class 0's two most confident: rows 0 and 2
    assert chosen.labels.tolist() == [0, 0, 1, 1]
    capped = select_pseudo_labels(probabilities, 0.9, per_class=1)
    assert capped.indices.tolist() == [0, 4]


def test_pseudo_labels_none_when_a_class_has_no_confident_prediction():
    probabilities = np.array([[0.99, 0.01], [0.95, 0.05], [0.4, 0.6]])
    chosen = select_pseudo_labels(probabilities, 0.9, per_class=5)
    assert len(chosen.indices) == 0 and chosen.added == {0: 0, 1: 0}


def test_pseudo_labels_multilabel():
    probabilities = np.array([
        [0.97, 0.02],  # sure: {0}
        [0.96, 0.95],  # sure: {0, 1}
        [0.99, 0.5],   # unsure about label 1
        [0.01, 0.99],  # sure: {1}
    ])
    chosen = select_pseudo_labels(probabilities, 0.9, per_class=5, multilabel=True)
    assert chosen.indices.tolist() == [0, 1, 3]
    assert chosen.labels.tolist() == [[1, 0], [1, 1], [0, 1]]


# ------------------------------------------------------------------------------- the head


def test_logistic_head_reproduces_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    kernel, bias = logistic_head(x, y, 2)
    expected = LogisticRegression(max_iter=1000).fit(x, y).predict_proba(x)
    np.testing.assert_allclose(head_probabilities(x, kernel, bias, False), expected, atol=1e-6)
    np.testing.assert_allclose(kernel[:, 0], -kernel[:, 1])  # two classes: symmetric logits


def test_logistic_head_never_predicts_an_unseen_class():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    y = np.where(x[:, 0] > 0, 2, 0)  # class 1 of three never occurs in training
    kernel, bias = logistic_head(x, y, 3)
    predicted = head_probabilities(rng.normal(size=(200, 4)), kernel, bias, False).argmax(axis=1)
    assert 1 not in set(predicted.tolist())
    assert np.all(kernel[:, 1] == 0)


def test_logistic_head_multilabel_constant_label():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 3))
    y = np.stack([(x[:, 0] > 0), np.ones(20, dtype=bool)], axis=1).astype(np.float32)
    kernel, bias = logistic_head(x, y, 2)
    assert np.all(kernel[:, 1] == 0) and bias[1] > 3  # always on, by its smoothed log odds
    probabilities = head_probabilities(x, kernel, bias, True)
    assert ((probabilities[:, 0] >= 0.5) == (x[:, 0] > 0)).mean() >= 0.9


# --------------------------------------------------------------------------- unlabelled files


def test_read_unlabeled_txt_and_csv(tmp_path):
    from tfsft.config import DataConfig
    from tfsft.data import read_unlabeled

    txt = tmp_path / "u.txt"
    txt.write_text("first text\n\n  second, with a comma  \n", encoding="utf-8")
    examples = read_unlabeled(str(txt), DataConfig(), ("sentence", None))
    assert examples.texts == ["first text", "second, with a comma"] and examples.rows == [1, 3]
    csv_file = write_csv(tmp_path / "u.csv", ["id", "sentence"], [["1", "a"], ["2", "b"]])
    assert read_unlabeled(str(csv_file), DataConfig(), ("sentence", None)).texts == ["a", "b"]
    with pytest.raises(DataError, match=r"u\.csv: missing column 'review'"):
        read_unlabeled(str(csv_file), DataConfig(), ("review", None))
    with pytest.raises(DataError, match=r"u\.txt: .*text pairs"):
        read_unlabeled(str(txt), DataConfig(), ("sentence1", "sentence2"))
    blank = write_csv(tmp_path / "b.csv", ["id", "sentence"], [["1", "a"], ["2", " "]])
    with pytest.raises(DataError, match=r"b\.csv: row 3: empty text"):
        read_unlabeled(str(blank), DataConfig(), ("sentence", None))


# ------------------------------------------------------------------------- TensorFlow parts


def test_cosine_similarity_loss_by_hand():
    from tfsft.few_shot import cosine_similarity_loss

    loss = cosine_similarity_loss(np.array([1.0, 0.0, 1.0]), np.array([0.5, 0.25, -1.0]))
    assert float(loss) == pytest.approx((0.5**2 + 0.25**2 + 2.0**2) / 3)


def test_pair_model_outputs_cosine_of_pooled_embeddings(tiny_checkpoint):
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.data import LabelMap
    from tfsft.few_shot import _pair_model, pooled_embedding
    from tfsft.modeling import build_classifier
    from tfsft.tokenize import pad_batch

    for pooling in ("cls", "mean"):
        model, _ = build_classifier(tiny_checkpoint, LabelMap(("a", "b")), pooling=pooling)
        encoder = text_encoder(load_tokenizer(tiny_checkpoint), 32)
        encoded = encoder.encode(["a good film", "a bad one", "loved it", "the plot is thin and slow"])
        batch = pad_batch(encoded, [0, 1, 2, 3], encoder.pad_id)
        similarity = _pair_model(model)(batch).numpy()
        pooled = pooled_embedding(model, batch).numpy()
        u, v = pooled[:2], pooled[2:]
        expected = (u * v).sum(axis=1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1)
        np.testing.assert_allclose(similarity, expected, atol=1e-5)
        if pooling == "mean":  # mean pooling ignores padding: the unpadded text alone gives the same vector
            alone = pad_batch(encoded, [0], encoder.pad_id)
            np.testing.assert_allclose(pooled_embedding(model, alone).numpy()[0], pooled[0], atol=1e-5)


def test_contrastive_stage_trains_encoder_not_head_and_head_is_written(tiny_checkpoint):
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.data import LabelMap
    from tfsft.few_shot import contrastive_fit, embed, fit_head
    from tfsft.modeling import build_classifier, feature_names, tf

    model, _ = build_classifier(tiny_checkpoint, LabelMap(("neg", "pos")), pooling="mean")
    encoder = text_encoder(load_tokenizer(tiny_checkpoint), 32)
    texts = ["great", "wonderful film", "loved it", "superb", "awful", "boring film", "hated it", "dreadful"]
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    encoded = encoder.encode(texts)
    names = feature_names(model)
    head_before = model.classifier.kernel.numpy().copy()
    encoder_before = model.bert.embeddings.weight.numpy().copy()
    settings = RunConfig.from_flat({"few_shot_pairs": 8, "few_shot_learning_rate": 1e-3, "few_shot_batch_size": 8}).train
    report = contrastive_fit(
        model, encoded, labels, settings, strategy=tf.distribute.get_strategy(), feature_names=names,
        pad_id=encoder.pad_id, seed=0,
    )
    assert report["pairs"] == 64
    assert report["loss_last"] < report["loss_first"]  # per-batch losses: the stage learns the pairs
    np.testing.assert_array_equal(model.classifier.kernel.numpy(), head_before)
    assert not np.allclose(model.bert.embeddings.weight.numpy(), encoder_before)
    assert model.classifier.trainable
    fit_head(model, encoded, labels, 2, feature_names=names, pad_id=encoder.pad_id)
    logits = model(_padded(encoded, encoder, names)).logits.numpy()
    from sklearn.linear_model import LogisticRegression

    embeddings = embed(model, encoded, names, encoder.pad_id)
    expected = LogisticRegression(max_iter=1000).fit(embeddings, labels).predict(embeddings)
    np.testing.assert_array_equal(logits.argmax(axis=1), expected)


def _padded(encoded, encoder, names):
    from tfsft.tokenize import pad_batch

    batch = pad_batch(encoded, list(range(len(encoded))), encoder.pad_id)
    return {name: batch[name] for name in names}


# ------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def few_label_files(tmp_path_factory, sst2_slices):
    """8 SST-2 sentences per class for training, 60 other training sentences without labels."""
    directory = tmp_path_factory.mktemp("few")
    lines = Path(sst2_slices["train"]).read_text(encoding="utf-8").splitlines()[1:]
    by_label: dict[str, list[str]] = {"0": [], "1": []}
    rest = []
    for line in lines:
        text, label = line.rsplit("\t", 1)
        (by_label[label] if len(by_label[label]) < 8 else rest).append(text)
    train = directory / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for l, ts in by_label.items() for t in ts), encoding="utf-8")
    unlabeled = directory / "unlabeled.txt"
    unlabeled.write_text("".join(f"{t}\n" for t in rest[:60]), encoding="utf-8")
    return {"train": train, "unlabeled": unlabeled, "dev": sst2_slices["dev"]}


def _run(tmp_path, checkpoint, files, **flags):
    from tfsft import finetune

    config = RunConfig.from_flat(dict(
        model_name_or_path=str(checkpoint), train_file=str(files["train"]), validation_file=str(files["dev"]),
        max_seq_length=48, max_eval_samples=64, output_dir=str(tmp_path / "run"), **flags,
    ))
    return finetune(config, verbose=0)


def test_few_shot_run_with_self_training_exports_and_serves(tmp_path, tiny_checkpoint, few_label_files):
    from tfsft.inference import Predictor

    result = _run(
        tmp_path, tiny_checkpoint, few_label_files, few_shot="on", few_shot_pairs=4, pooling="mean",
        unlabeled_file=str(few_label_files["unlabeled"]), pseudo_label_threshold=0.5, pseudo_labels_per_class=5,
        self_training_rounds=2, export=True, class_weights="balanced",  # weighs labelled and pseudo-labelled examples
    )
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["few_shot"] == "on" and metrics["few_shot_pairs_trained"] == 16 * 4
    assert metrics["epochs"] == 0 and "eval_accuracy" in metrics
    rounds = metrics["self_training"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert set(record["added"]) == {"0", "1"}
        assert len(set(record["added"].values())) == 1 and 0 < record["added"]["0"] <= 5  # balanced, capped
    assert rounds[1]["candidates"] == 60 - 2 * rounds[0]["added"]["0"]
    assert json.loads((result.run_dir / "config.json").read_text())["train"]["few_shot"] == "on"
    assert (result.run_dir / "onnx" / "bundle.json").is_file()  # written only when parity passed
    report = json.loads((result.run_dir / "onnx" / "export_report.json").read_text())
    assert all(row["label_agreement"] == 1.0 for row in report["parity"]["model.fused.onnx"].values())
    predictions = Predictor(result.run_dir / "onnx").predict(["a moving film", "a dull mess"])
    assert {p.label for p in predictions} <= {"0", "1"}


def test_auto_turns_on_for_a_sentence_encoder_and_end_to_end_epochs_follow(tmp_path, tiny_checkpoint, few_label_files):
    """8 per class and mean pooling: auto is on (recorded); then two epochs of ordinary fine-tuning.
    (The [CLS]-pooled tiny BERT of every other run test trains plainly under auto.)"""
    result = _run(
        tmp_path, tiny_checkpoint, few_label_files, export=False, pooling="mean", few_shot_pairs=2,
        few_shot_end_to_end_epochs=2, learning_rate=1e-3,
    )
    assert result.metrics["few_shot"] == "on" and result.metrics["epochs"] == 2
    assert json.loads((result.run_dir / "config.json").read_text())["train"]["few_shot"] == "on"


def test_unlabeled_file_with_auto_resolved_off_is_refused(tmp_path, tiny_checkpoint, few_label_files):
    with pytest.raises(ConfigError, match="unlabeled_file"):
        _run(tmp_path, tiny_checkpoint, few_label_files, export=False, unlabeled_file=str(few_label_files["unlabeled"]))
    assert not (tmp_path / "run").exists()


def test_few_shot_on_refuses_a_head_it_cannot_fit():
    from tfsft.few_shot import check_few_shot_model
    from tfsft.modeling import tf

    class Headless:
        classifier = tf.keras.layers.Dense(2)
        base_model_prefix = "missing"
        config = type("C", (), {})()

    with pytest.raises(ConfigError, match="--few_shot on needs a model"):
        check_few_shot_model(Headless())


def test_few_shot_text_pairs_with_unlabeled_pairs(tmp_path, tiny_checkpoint, mrpc_slices):
    """MRPC: each example is a sentence pair embedded jointly; the unlabelled file gives pairs too."""
    from tfsft import finetune

    columns = dict(text_column="#1 String", text_pair_column="#2 String", label_column="Quality")
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(mrpc_slices["train"]), max_train_samples=24,
        validation_file=str(mrpc_slices["test"]), max_eval_samples=32, max_seq_length=64, pooling="mean",
        few_shot="on", few_shot_pairs=2, unlabeled_file=str(mrpc_slices["test"]), max_unlabeled_samples=40,
        pseudo_label_threshold=0.5, pseudo_labels_per_class=3, output_dir=str(tmp_path / "run"), export=False,
        **columns,
    ))
    metrics = finetune(config, verbose=0).metrics
    assert metrics["few_shot"] == "on" and metrics["few_shot_pairs_trained"] == 24 * 2
    assert metrics["self_training"][0]["candidates"] == 40 and "eval_f1" in metrics


def test_few_shot_multilabel_run(tmp_path, tiny_checkpoint, sst2_slices):
    from tfsft import finetune

    rows = [line.rsplit("\t", 1) for line in Path(sst2_slices["train"]).read_text(encoding="utf-8").splitlines()[1:25]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(
        json.dumps({"text": text, "labels": ["pos" if label == "1" else "neg"] + (["short"] if len(text.split()) < 6 else [])}) + "\n"
        for text, label in rows
    ), encoding="utf-8")
    config = RunConfig.from_flat(dict(
        task="multilabel", model_name_or_path=str(tiny_checkpoint), train_file=str(train), validation_file=str(train),
        label_column="labels", max_seq_length=48, pooling="mean", few_shot_pairs=2, output_dir=str(tmp_path / "run"),
        export=False,
    ))
    metrics = finetune(config, verbose=0).metrics
    assert metrics["few_shot"] == "on"  # auto: every label has at most 64 examples, mean pooling
    assert 0 <= metrics["few_shot_head_train_accuracy"] <= 1 and "eval_f1_micro" in metrics
