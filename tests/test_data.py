import json

import numpy as np
import pytest

from conftest import shared_path, write_csv
from tfsft.config import DataConfig
from tfsft.data import (
    LabelMap,
    embedded_examples,
    load_splits,
    plan_batches,
    count_batches,
    read_examples,
    stratified_split,
)
from tfsft.errors import DataError


def test_reads_glue_tsv_with_quotes_unquoted():
    examples = read_examples(str(shared_path("glue", "SST-2", "dev.tsv")), DataConfig())
    assert len(examples) == 872 and examples.pairs is None
    assert set(examples.labels) == {"0", "1"}


def test_reads_sentence_pairs_with_explicit_columns():
    config = DataConfig(text_column="#1 String", text_pair_column="#2 String", label_column="Quality")
    examples = read_examples(str(shared_path("glue", "MRPC", "test.tsv")), config)
    assert len(examples) == 1725 and examples.pairs is not None
    assert any('"' in text for text in examples.texts + examples.pairs)


def test_sentence1_sentence2_are_default_pair_columns():
    examples = read_examples(str(shared_path("glue", "STS-B", "dev.tsv")), DataConfig(label_column="score"))
    assert examples.pairs is not None and len(examples) == 1500


def test_csv_jsonl_and_headerless(tmp_path):
    csv_path = write_csv(tmp_path / "a.csv", ["text", "label"], [["good, \"quoted\" film", "pos"], ["bad", "neg"]])
    examples = read_examples(str(csv_path), DataConfig())
    assert examples.texts[0] == 'good, "quoted" film' and examples.labels == ["pos", "neg"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": t, "label": i}) for i, t in enumerate(["x", "y"])) + "\n")
    assert read_examples(str(jsonl), DataConfig()).labels == ["0", "1"]
    headerless = tmp_path / "b.tsv"
    headerless.write_text("nice one\t1\nawful\t0\n")
    examples = read_examples(str(headerless), DataConfig(no_header=True))
    assert examples.texts == ["nice one", "awful"] and examples.labels == ["1", "0"]


def test_label_map_orders_integers_numerically_and_rejects_unseen(tmp_path):
    label_map = LabelMap.from_labels(["10", "2", "1", "2"])
    assert label_map.names == ("1", "2", "10")
    path = write_csv(tmp_path / "dev.csv", ["text", "label"], [["ok", "1"], ["new", "7"]])
    with pytest.raises(DataError, match=r"dev.csv: row 3: label '7' never appears"):
        label_map.encode(read_examples(str(path), DataConfig()))


def test_single_class_training_data_is_rejected():
    with pytest.raises(DataError, match="only one class"):
        LabelMap.from_labels(["a", "a"])


@pytest.mark.parametrize(
    "content, suffix, fragment",
    [
        (b"", ".csv", "empty"),
        (b"text,label\n", ".csv", "header only"),
        (b"text,label\nfine,1\nragged,1,extra\n", ".csv", "row 3: expected 2 fields"),
        (b"text,label\n\"never closed,1\n", ".csv", "malformed CSV"),
        (b"text,label\nok,1\ncaf\xe9,0\n", ".csv", "row 3: not valid UTF-8"),
        (b"text,label\n   ,1\n", ".csv", "row 2: empty text"),
        (b"text,label\nok,\n", ".csv", "row 2: missing or blank label"),
        (b"text,label\nok,nan\n", ".csv", "row 2: missing or blank label"),
        (b"words,label\nok,1\n", ".csv", "no text column"),
        (b"text,text,label\na,b,1\n", ".csv", "duplicated column"),
        (b"text\tlabel\nok\t1\nbad\n", ".tsv", "row 3: expected 2 fields"),
        (b'{"text": "ok", "label": 1}\n{"text": "broken"\n', ".jsonl", "row 2: malformed JSON"),
        (b"text,label\nok,1\n", ".parquet", "unknown file type"),
    ],
)
def test_bad_files_name_file_and_row(tmp_path, content, suffix, fragment):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError, match=fragment) as info:
        read_examples(str(path), DataConfig())
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_directory_and_missing_column(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_examples(str(tmp_path / "nope.csv"), DataConfig())
    with pytest.raises(DataError, match="is a directory"):
        read_examples(str(tmp_path), DataConfig())
    path = write_csv(tmp_path / "a.csv", ["text", "target"], [["x", "1"]])
    with pytest.raises(DataError, match="missing column 'label'"):
        read_examples(str(path), DataConfig())


def test_stratified_split_is_seeded_and_keeps_class_ratio():
    examples = read_examples(str(shared_path("glue", "SST-2", "dev.tsv")), DataConfig())
    train, held = stratified_split(examples, 20, seed=3)
    again_train, again_held = stratified_split(examples, 20, seed=3)
    assert held.rows == again_held.rows and len(train) + len(held) == len(examples)
    assert not set(train.rows) & set(held.rows)
    ratio = lambda e: np.mean([label == "1" for label in e.labels])  # noqa: E731
    assert abs(ratio(held) - ratio(examples)) < 0.02
    assert stratified_split(examples, 20, seed=4)[1].rows != held.rows


def test_embedded_default_dataset_has_three_classes():
    examples = embedded_examples()
    assert len(examples) > 38000
    assert set(examples.labels) == {"negative", "neutral", "positive"}


def test_load_splits_holds_out_validation_and_caps_samples(tmp_path):
    config = DataConfig(train_file=str(shared_path("glue", "SST-2", "dev.tsv")), max_train_samples=100, validation_split_percentage=10)
    splits = load_splits(config, seed=0)
    assert len(splits.train) == 100 and len(splits.validation) == 87 and splits.test is None


def test_batches_group_similar_lengths_and_cover_every_example():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=5000)
    batches = plan_batches(lengths, 32, shuffle=True, seed=1, epoch=0)
    assert len(batches) == count_batches(5000, 32)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    random_spread = np.mean([lengths[b].max() - lengths[b].min() for b in np.array_split(rng.permutation(5000), len(batches))])
    assert spread < random_spread / 5
    other_epoch = plan_batches(lengths, 32, shuffle=True, seed=1, epoch=1)
    same_epoch = plan_batches(lengths, 32, shuffle=True, seed=1, epoch=0)
    assert all((a == b).all() for a, b in zip(batches, same_epoch))
    assert any(len(a) != len(b) or (a != b).any() for a, b in zip(batches, other_epoch))


def test_evaluation_batches_are_sorted_by_length():
    lengths = np.array([9, 3, 7, 1, 5])
    batches = plan_batches(lengths, 2, shuffle=False)
    assert [lengths[b].tolist() for b in batches] == [[1, 3], [5, 7], [9]]
