"""Distillation (tfsft.distillation): the loss against hand computations, the teacher's outputs
(bundle and Keras, label order, cache), refusals, and a whole run."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_run
from tfsft.data import LabelMap
from tfsft.errors import ConfigError


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _per_example(loss, targets: np.ndarray, logits: np.ndarray) -> np.ndarray:
    from tfsft.modeling import tf

    return loss(tf.constant(targets, tf.float32), tf.constant(logits, tf.float32)).numpy()


def test_classification_loss_mixes_cross_entropy_and_scaled_kl_by_hand():
    from tfsft.distillation import distillation_objective, pack_targets

    rng = np.random.RandomState(0)
    student, teacher = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) * 3
    labels = np.array([0, 2, 1, 2])
    alpha, t = 0.3, 2.0
    loss, [metric] = distillation_objective("classification", 3, alpha, t)
    hard = -_log_softmax(student)[np.arange(4), labels]
    soft_target = np.exp(_log_softmax(teacher / t))
    kl = (soft_target * (np.log(soft_target) - _log_softmax(student / t))).sum(axis=1)
    expected = alpha * hard + (1 - alpha) * kl * t * t
    np.testing.assert_allclose(_per_example(loss, pack_targets("classification", labels, teacher), student), expected, rtol=1e-5)
    np.testing.assert_allclose(_per_example(loss, labels, student), hard, rtol=1e-5)  # plain targets: plain loss
    assert metric.__name__ == "accuracy"
    accuracy = _per_example(metric, pack_targets("classification", labels, teacher), student)
    np.testing.assert_array_equal(accuracy, (student.argmax(1) == labels).astype(np.float32))


def test_regression_and_multilabel_losses_by_hand():
    from tfsft.distillation import distillation_objective, pack_targets

    rng = np.random.RandomState(1)
    loss, _ = distillation_objective("regression", 1, 0.25, 5.0)
    student, gold, teacher = rng.normal(size=(5, 1)), rng.normal(size=5), rng.normal(size=(5, 1))
    expected = 0.25 * (student[:, 0] - gold) ** 2 + 0.75 * (student[:, 0] - teacher[:, 0]) ** 2  # no temperature
    np.testing.assert_allclose(_per_example(loss, pack_targets("regression", gold, teacher), student), expected, rtol=1e-5)

    loss, _ = distillation_objective("multilabel", 3, 0.5, 2.0)
    student, teacher = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    gold = (rng.uniform(size=(4, 3)) > 0.5).astype(np.float32)

    def bce(target, logits):
        p = 1 / (1 + np.exp(-logits))
        return -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean(axis=1)

    expected = 0.5 * bce(gold, student) + 0.5 * bce(1 / (1 + np.exp(-teacher / 2)), student / 2) * 4
    np.testing.assert_allclose(_per_example(loss, pack_targets("multilabel", gold, teacher), student), expected, rtol=1e-4)


def test_teacher_outputs_follow_the_students_label_order_through_bundle_and_keras(
    tmp_path, tiny_checkpoint, sst2_slices, capsys
):
    from tfsft.data import read_examples
    from tfsft.config import DataConfig
    from tfsft.distillation import compute_teacher_logits, teacher_logits
    from tfsft.export import export_bundle
    from tfsft.inference import Predictor

    model, run_dir, examples, labels = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"], quantize=False)
    examples = read_examples(str(sst2_slices["dev"]), DataConfig()).subset(range(20))
    keras = compute_teacher_logits(str(run_dir), examples, "classification", LabelMap(("0", "1")))
    swapped = compute_teacher_logits(str(run_dir), examples, "classification", LabelMap(("1", "0")))
    np.testing.assert_array_equal(swapped, keras[:, ::-1])
    export_bundle(model, run_dir, validation_data=(examples, labels[:20]))
    onnx = compute_teacher_logits(str(run_dir), examples, "classification", LabelMap(("0", "1")))
    np.testing.assert_allclose(onnx, keras, atol=1e-4)
    np.testing.assert_allclose(onnx, Predictor(run_dir / "onnx").logits(list(examples.texts)), atol=1e-6)
    chunked = compute_teacher_logits(str(run_dir), examples, "classification", LabelMap(("0", "1")), progress_every=7)
    np.testing.assert_allclose(chunked, onnx, atol=1e-6)
    assert "teacher outputs: 14 of 20 texts" in capsys.readouterr().err

    cache = tmp_path / "teacher_logits.npy"
    first, source = teacher_logits(str(run_dir), examples, "classification", LabelMap(("0", "1")), cache)
    assert source == "computed" and cache.is_file()
    again, source = teacher_logits(str(run_dir), examples, "classification", LabelMap(("0", "1")), cache)
    assert source == "run" and np.array_equal(again, first)
    _, source = teacher_logits(str(run_dir), examples.subset(range(10)), "classification", LabelMap(("0", "1")), cache)
    assert source == "computed"  # other examples: computed again


def test_the_shared_teacher_cache_is_keyed_by_teacher_files_texts_and_labels(tmp_path, tiny_checkpoint, sst2_slices, capsys):
    """--teacher_cache_dir: another run (another run-level cache) reads the outputs back; other
    texts, another label order or a changed teacher file miss; a corrupt entry is recomputed."""
    from tfsft import distillation
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    examples = read_examples(str(sst2_slices["dev"]), DataConfig()).subset(range(24))
    shared, labels = tmp_path / "shared", LabelMap(("0", "1"))

    def outputs(name: str, examples=examples, labels=labels):
        cache = distillation.shared_cache(shared, str(run_dir))  # as a run makes it: the teacher's files hashed now
        return distillation.teacher_logits(str(run_dir), examples, "classification", labels, tmp_path / name, cache)

    first, source = outputs("a.npy")
    assert source == "computed" and len(list(shared.glob("*.npy"))) == 1
    again, source = outputs("b.npy")
    assert source == "shared cache" and np.array_equal(again, first)
    assert np.array_equal(np.load(tmp_path / "b.npy"), first)  # the run keeps its own copy
    part, source = outputs("c.npy", examples.subset(range(1, 24)))
    assert source == "shared cache" and np.array_equal(part, first[1:])  # other texts, all labelled before
    swapped, source = outputs("d.npy", labels=LabelMap(("1", "0")))
    assert source == "computed" and np.array_equal(swapped, first[:, ::-1])
    config = run_dir / "config.json"
    config.write_text(config.read_text() + "\n")
    assert outputs("e.npy")[1] == "computed"  # a teacher file changed: another key
    assert len(list(shared.glob("*.npy"))) == 4
    key = distillation.teacher_outputs_key(
        distillation.shared_cache(shared, str(run_dir)).teacher_digest, examples, "classification", labels
    )
    entry = shared / f"{key}.npy"
    entry.write_bytes(b"not an array")
    recomputed, source = outputs("f.npy")
    assert source == "computed" and np.allclose(recomputed, first, atol=1e-6)  # its texts were in no other entry
    assert "ignoring the unreadable cache entry" in capsys.readouterr().err
    assert outputs("g.npy")[1] == "shared cache"  # overwritten with good outputs


def test_the_shared_teacher_cache_computes_only_the_texts_no_run_labelled(
    tmp_path, tiny_checkpoint, sst2_slices, capsys, monkeypatch
):
    """More augmented texts than a run before had: the texts it labelled are read back text by
    text, whatever their position, and only the new ones go through the teacher; texts under
    another label order or teacher are never reused."""
    from tfsft import distillation
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    examples = read_examples(str(sst2_slices["dev"]), DataConfig()).subset(range(30))
    shared, labels = tmp_path / "shared", LabelMap(("0", "1"))
    computed = []
    compute = distillation.compute_teacher_logits

    def counting(teacher, texts, *args, **kwargs):
        computed.append(list(texts.texts))
        return compute(teacher, texts, *args, **kwargs)

    def outputs(name, examples, labels=labels):
        cache = distillation.shared_cache(shared, str(run_dir))
        return distillation.teacher_logits(str(run_dir), examples, "classification", labels, tmp_path / name, cache)

    reference = compute(str(run_dir), examples, "classification", labels)
    monkeypatch.setattr(distillation, "compute_teacher_logits", counting)
    outputs("a.npy", examples.subset(range(0, 12)))
    outputs("b.npy", examples.subset(range(20, 25)))
    order = [24, *range(12, 20), 3, 0, *range(25, 30), 11, 3]  # text 3 twice
    grown, source = outputs("c.npy", examples.subset(order))
    assert source == "shared cache in part"
    assert computed[-1] == [examples.texts[i] for i in [*range(12, 20), *range(25, 30)]]
    np.testing.assert_allclose(grown, reference[order], atol=1e-6)
    assert "5 of 18 texts read from the shared cache, computing the other 13" in capsys.readouterr().err
    again, source = outputs("d.npy", examples.subset(order[::-1]))
    assert source == "shared cache" and np.array_equal(again, grown[::-1]) and len(computed) == 3
    swapped, source = outputs("e.npy", examples.subset(range(0, 12)), LabelMap(("1", "0")))
    assert source == "computed" and len(computed[-1]) == 12
    np.testing.assert_allclose(swapped, reference[:12, ::-1], atol=1e-6)
    for digests in shared.glob(f"*{distillation.DIGESTS_SUFFIX}"):
        digests.unlink()  # the entries as a cache written before text-by-text lookup has them
    _, source = outputs("f.npy", examples.subset(range(0, 12)))
    assert source == "shared cache" and len(computed) == 4
    more, source = outputs("g.npy", examples.subset(range(0, 14)))
    assert source == "shared cache in part" and computed[-1] == examples.texts[12:14]
    np.testing.assert_allclose(more, reference[:14], atol=1e-6)


def test_a_teacher_of_another_task_or_labels_or_no_run_is_refused(tmp_path, tiny_checkpoint, sst2_slices):
    from tfsft.distillation import check_teacher, teacher_columns

    _, run_dir, _, _ = make_run(tmp_path, tiny_checkpoint, sst2_slices["dev"])
    with pytest.raises(ConfigError, match="trained for --task classification, this run is --task regression"):
        teacher_columns(str(run_dir), "regression", LabelMap(("score",)))
    with pytest.raises(ConfigError, match=r"predicts labels \['0', '1'\], this run's are \['0', '1', '2'\]"):
        teacher_columns(str(run_dir), "classification", LabelMap(("0", "1", "2")))
    with pytest.raises(ConfigError, match="neither an ONNX bundle"):
        check_teacher(str(tmp_path / "nothing"))


def test_distillation_flags_are_checked():
    from tfsft.config import RunConfig

    with pytest.raises(ConfigError, match="--task ner"):
        RunConfig.from_flat({"task": "ner", "train_file": "x.txt", "teacher_model": "run"})
    with pytest.raises(ConfigError, match="few_shot"):
        RunConfig.from_flat({"teacher_model": "run", "few_shot": "on"})
    with pytest.raises(ConfigError, match="distill_alpha"):
        RunConfig.from_flat({"teacher_model": "run", "distill_alpha": 1.5})
    with pytest.raises(ConfigError, match="distill_temperature"):
        RunConfig.from_flat({"teacher_model": "run", "distill_temperature": 0})
    RunConfig.from_flat({"teacher_model": "run", "unlabeled_file": "more.txt", "few_shot": "off"})  # teacher labels it
    with pytest.raises(ConfigError, match="augment_texts.*without --teacher_model"):
        RunConfig.from_flat({"augment_texts": 100})
    with pytest.raises(ConfigError, match="augment_texts"):
        RunConfig.from_flat({"teacher_model": "run", "augment_texts": -1})
    with pytest.raises(ConfigError, match="teacher_cache_dir.*without --teacher_model"):
        RunConfig.from_flat({"teacher_cache_dir": "cache"})


def _sentiment_rows(count: int, seed: int) -> list[list[str]]:
    """Texts whose label is set by one word (a tiny mean-pooled model learns it in a few epochs)."""
    rng = np.random.RandomState(seed)
    filler = ["the", "film", "was", "a", "story", "of", "it", "really", "plot", "and", "acting", "quite"]
    rows = []
    for _ in range(count):
        label = int(rng.randint(2))
        word = rng.choice(["good", "great", "lovely", "fine"] if label else ["bad", "awful", "poor", "dull"])
        words = list(rng.choice(filler, size=5)) + [word]
        rng.shuffle(words)
        rows.append([" ".join(words), str(label)])
    return rows


def test_a_student_distilled_with_alpha_zero_learns_the_teacher_not_the_labels(tmp_path, tiny_checkpoint, monkeypatch):
    """With alpha 0 the labels carry no weight: the student learns the teacher's decisions. The
    teacher here contradicts every label (its outputs are those of a run whose label file was
    inverted), so the student's decisions say which of the two it learned from."""
    from conftest import write_csv
    from tfsft import RunConfig, distillation, finetune
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], _sentiment_rows(320, 0))
    dev = write_csv(tmp_path / "dev.csv", ["sentence", "label"], _sentiment_rows(64, 1))
    _, teacher_run, _, _ = make_run(tmp_path / "teacher", tiny_checkpoint, dev)
    examples = read_examples(str(train), DataConfig())
    gold = np.array([int(label) for label in examples.labels])
    keras_outputs = distillation.compute_teacher_logits

    def contradicting_teacher(teacher, examples, task, label_map):
        decided = np.array([1 - int(label) for label in examples.labels])
        return np.stack([np.where(decided == 0, 4.0, -4.0), np.where(decided == 1, 4.0, -4.0)], axis=1).astype(np.float32)

    monkeypatch.setattr(distillation, "compute_teacher_logits", contradicting_teacher)
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(train), validation_file=str(dev), num_train_epochs=3,
        learning_rate=3e-3, warmup_ratio=0.0, per_device_train_batch_size=16, max_seq_length=16, pooling="mean",
        output_dir=str(tmp_path / "student"), export=False, teacher_model=str(teacher_run), distill_alpha=0.0,
        distill_temperature=1.0,
    ))
    result = finetune(config, verbose=0)
    assert result.metrics["teacher_examples"] == 320 and result.metrics["teacher_train_agreement"] == 0.0
    np.testing.assert_array_equal(np.load(result.run_dir / "teacher_logits.npy").argmax(1), 1 - gold)
    student = keras_outputs(str(result.run_dir), examples, "classification", LabelMap(("0", "1"))).argmax(1)
    assert (student == 1 - gold).mean() > 0.9, "the student did not learn the teacher's decisions"
    assert result.metrics["eval_accuracy"] < 0.2  # it learned them as a rule: the dev labels it contradicts too


def test_unlabeled_texts_join_training_with_the_teachers_labels(tmp_path, tiny_checkpoint, sst2_slices):
    """--unlabeled_file: the teacher labels them; they train beside the labelled examples."""
    from tfsft import RunConfig, finetune
    from tfsft.config import DataConfig
    from tfsft.data import read_examples

    _, teacher_run, _, _ = make_run(tmp_path / "teacher", tiny_checkpoint, sst2_slices["dev"])
    unlabeled = tmp_path / "unlabeled.txt"
    unlabeled.write_text("\n".join(read_examples(str(sst2_slices["dev"]), DataConfig()).texts[:30]) + "\n")
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["dev"]),
        validation_file=str(sst2_slices["dev"]), max_train_samples=50, num_train_epochs=1, max_seq_length=32,
        output_dir=str(tmp_path / "student"), export=False, teacher_model=str(teacher_run),
        unlabeled_file=str(unlabeled),
    ))
    metrics = finetune(config, verbose=0).metrics
    assert (metrics["teacher_examples"], metrics["teacher_labelled_examples"], metrics["train_samples"]) == (50, 30, 80)
    assert (tmp_path / "student" / "teacher_logits_unlabeled.npy").is_file()
    assert not metrics["teacher_outputs_cached"]


def test_runs_share_teacher_outputs_through_the_teacher_cache_dir(tmp_path, tiny_checkpoint, sst2_slices, monkeypatch):
    """A second run with other distillation settings reads the first run's teacher outputs back
    (the teacher is not run again) and writes them into its own run directory."""
    from tfsft import RunConfig, distillation, finetune

    _, teacher_run, _, _ = make_run(tmp_path / "teacher", tiny_checkpoint, sst2_slices["dev"])
    settings = dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["dev"]), validation_split_percentage=20,
        max_train_samples=60, num_train_epochs=1, max_seq_length=32, export=False, teacher_model=str(teacher_run),
        teacher_cache_dir=str(tmp_path / "cache"),
    )
    first = finetune(RunConfig.from_flat(dict(settings, output_dir=str(tmp_path / "a"))), verbose=0)
    assert not first.metrics["teacher_outputs_cached"]
    calls = []
    compute = distillation.compute_teacher_logits
    monkeypatch.setattr(distillation, "compute_teacher_logits", lambda *args, **kw: calls.append(1) or compute(*args, **kw))
    second = finetune(RunConfig.from_flat(dict(settings, output_dir=str(tmp_path / "b"), distill_alpha=0.2)), verbose=0)
    assert second.metrics["teacher_outputs_cached"] and not calls
    np.testing.assert_array_equal(np.load(second.run_dir / "teacher_logits.npy"), np.load(first.run_dir / "teacher_logits.npy"))


def test_augmented_texts_are_made_from_training_texts_and_labelled_by_the_teacher(tmp_path, tiny_checkpoint, sst2_slices):
    """--augment_texts: N new texts from the training split (not the held-out part), written to the
    run, labelled by the teacher, trained on beside the labelled examples; the same seed gives
    the same texts."""
    from tfsft import RunConfig, finetune
    from tfsft.config import DataConfig
    from tfsft.data import read_examples
    from tfsft.pipeline import AUGMENTED_TEXTS_FILE

    _, teacher_run, _, _ = make_run(tmp_path / "teacher", tiny_checkpoint, sst2_slices["dev"])
    settings = dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["dev"]), validation_split_percentage=20,
        num_train_epochs=1, max_seq_length=48, export=False, teacher_model=str(teacher_run), augment_texts=40,
    )
    metrics = finetune(RunConfig.from_flat(dict(settings, output_dir=str(tmp_path / "a"))), verbose=0).metrics
    assert (metrics["teacher_examples"], metrics["teacher_labelled_examples"], metrics["train_samples"]) == (160, 40, 200)
    assert metrics["augmented_texts"] == 40
    texts = (tmp_path / "a" / AUGMENTED_TEXTS_FILE).read_text().splitlines()
    assert len(texts) == len(set(texts)) == 40
    assert len(np.load(tmp_path / "a" / "teacher_logits_unlabeled.npy")) == 40
    words = {w for text in read_examples(str(sst2_slices["dev"]), DataConfig()).texts for w in text.split()}
    new_words = {w for text in texts for w in text.split()} - words - {"but", "yet", ";", ","}
    assert new_words, "no word was replaced by a neighbour"
    assert all(len(w) >= 3 and w.isalpha() for w in new_words), new_words
    again = finetune(RunConfig.from_flat(dict(settings, output_dir=str(tmp_path / "b"))), verbose=0)
    assert (again.run_dir / AUGMENTED_TEXTS_FILE).read_text().splitlines() == texts


def test_augmentation_of_sentence_pairs_is_refused_naming_the_file(tmp_path, tiny_checkpoint, sst2_slices):
    from conftest import write_csv
    from tfsft import RunConfig, finetune

    rows = [[f"the film number {i} was good", f"a movie {i}", str(i % 2)] for i in range(40)]
    pairs = write_csv(tmp_path / "pairs.csv", ["sentence1", "sentence2", "label"], rows)
    _, teacher_run, _, _ = make_run(tmp_path / "teacher", tiny_checkpoint, sst2_slices["dev"])
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(pairs), num_train_epochs=1, max_seq_length=32,
        output_dir=str(tmp_path / "student"), export=False, teacher_model=str(teacher_run), augment_texts=10,
    ))
    with pytest.raises(ConfigError, match=r"pairs\.csv has sentence pairs"):
        finetune(config, verbose=0)
    assert not (tmp_path / "student").exists()
