import json
import sys
import types

import numpy as np
import pytest

from conftest import shared_path, write_csv
from tfsft.config import DataConfig
from tfsft.data import (
    LabelMap,
    count_batches,
    embedded_examples,
    encode_labels,
    hub_splits,
    load_splits,
    plan_batches,
    read_columns,
    read_examples,
    sample,
    stratified_split,
    task_label_map,
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


# ------------------------------------------------------------------------ Hub data sets (faked)


class FakeClassLabel:
    """Stands in for `datasets.ClassLabel`: the declared label names, in id order."""

    def __init__(self, names):
        self.names = list(names)


class FakeValue:
    """Stands in for `datasets.Value` (a plain typed column, e.g. STS-B's float label)."""

    def __init__(self, dtype):
        self.dtype = dtype


class FakeSplit:
    """What hub_splits uses of a `datasets.Dataset`: column names, features, rows as dicts."""

    def __init__(self, rows, features):
        self.rows, self.features, self.column_names = rows, features, list(features)

    def __iter__(self):
        return (dict(row) for row in self.rows)

    def __len__(self):
        return len(self.rows)


def glue_rows(path, columns, rows, start=0, label=None):
    """Rows of a shared GLUE TSV as Hub rows: {hub name: value}, `columns` mapping hub names to
    file columns (or to a function of the file row); `label` replaces every label (-1: a test split)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    out = []
    for idx, line in enumerate(lines[1 + start : 1 + start + rows]):
        record = dict(zip(header, line.split("\t")))
        row = {name: source(record) if callable(source) else record[source] for name, source in columns.items()}
        row["idx"] = idx
        if label is not None:
            row["label"] = label
        out.append(row)
    return out


def fake_glue(name):
    """The splits `datasets.load_dataset("glue", name)` returns, built from the shared GLUE files."""
    glue = lambda *parts: shared_path("glue", *parts)  # noqa: E731
    if name == "sst2":
        features = {
            "sentence": FakeValue("string"), "label": FakeClassLabel(["negative", "positive"]),
            "idx": FakeValue("int32"),
        }
        columns = {"sentence": "sentence", "label": lambda r: int(r["label"])}
        train, dev = glue("SST-2", "train.tsv"), glue("SST-2", "dev.tsv")
        return {
            "train": FakeSplit(glue_rows(train, columns, 60), features),
            "validation": FakeSplit(glue_rows(dev, columns, 20), features),
            "test": FakeSplit(glue_rows(dev, columns, 20, start=20, label=-1), features),
        }
    if name == "mrpc":
        features = {
            "sentence1": FakeValue("string"), "sentence2": FakeValue("string"),
            "label": FakeClassLabel(["not_equivalent", "equivalent"]), "idx": FakeValue("int32"),
        }
        columns = {"sentence1": "#1 String", "sentence2": "#2 String", "label": lambda r: int(r["Quality"])}
        train, test = glue("MRPC", "train.tsv"), glue("MRPC", "test.tsv")
        return {
            "train": FakeSplit(glue_rows(train, columns, 60), features),
            "validation": FakeSplit(glue_rows(test, columns, 30), features),
            "test": FakeSplit(glue_rows(test, columns, 30, start=30, label=-1), features),
        }
    if name == "stsb":
        features = {
            "sentence1": FakeValue("string"), "sentence2": FakeValue("string"),
            "label": FakeValue("float32"), "idx": FakeValue("int32"),
        }
        columns = {"sentence1": "sentence1", "sentence2": "sentence2", "label": lambda r: float(r["score"])}
        train, dev = glue("STS-B", "train.tsv"), glue("STS-B", "dev.tsv")
        return {
            "train": FakeSplit(glue_rows(train, columns, 60), features),
            "validation": FakeSplit(glue_rows(dev, columns, 20), features),
            "test": FakeSplit(glue_rows(dev, columns, 20, start=20, label=-1.0), features),
        }
    raise ValueError(name)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A fake `datasets` module whose load_dataset serves GLUE configs (or `splits` set by a test)."""
    module = types.ModuleType("datasets")
    module.overrides = {}

    def load_dataset(name, config_name=None):
        return module.overrides.get(config_name) or fake_glue(config_name)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


def hub_config(name, **flags):
    return DataConfig(dataset_name="glue", dataset_config_name=name, **flags)


@pytest.mark.parametrize("name, task", [("sst2", "classification"), ("mrpc", "classification"), ("stsb", "regression")])
def test_hub_glue_test_split_without_labels_is_predict_only(fake_datasets, capsys, name, task):
    hub = hub_splits(hub_config(name))
    assert sorted(hub) == ["train", "validation"]
    assert "glue[test]" in capsys.readouterr().err
    splits = load_splits(hub_config(name), seed=0, stratify=task == "classification")
    assert splits.test is None and len(splits.validation) == 20 + 10 * (name == "mrpc")
    label_map = task_label_map(task, splits.train)
    for examples in (splits.train, splits.validation):
        labels = encode_labels(task, label_map, examples)
        assert (labels >= 0).all()


def test_hub_missing_label_in_a_scored_split_names_the_row(fake_datasets):
    splits = fake_glue("sst2")
    splits["validation"].rows[4]["label"] = -1
    fake_datasets.overrides["sst2"] = splits
    with pytest.raises(DataError, match=r"glue\[validation\]: row 5: missing or blank label in column 'label'"):
        hub_splits(hub_config("sst2"))


def test_hub_class_label_order_is_kept(fake_datasets):
    splits = load_splits(hub_config("mrpc"), seed=0)
    label_map = task_label_map("classification", splits.train)
    assert label_map.names == ("not_equivalent", "equivalent")
    raw = [row["label"] for row in fake_glue("mrpc")["validation"].rows]
    assert encode_labels("classification", label_map, splits.validation).tolist() == raw
    held_train, held = stratified_split(splits.train, 20, seed=0)
    assert task_label_map("classification", held).names == ("not_equivalent", "equivalent")
    assert sample(held_train, 5, seed=0).label_names == ("not_equivalent", "equivalent")


def test_declared_label_order_keeps_every_class_and_refuses_undeclared():
    label_map = LabelMap.from_labels(["pos", "neg", "pos"], names=("pos", "neutral", "neg"))
    assert label_map.names == ("pos", "neutral", "neg")
    with pytest.raises(DataError, match="label 'other' is not one of the declared labels"):
        LabelMap.from_labels(["pos", "other"], "x", names=("pos", "neg"))
    with pytest.raises(DataError, match="only one class"):
        LabelMap.from_labels(["pos", "pos"], names=("pos", "neg"))


def test_hub_mnli_pairs_and_matched_validation(fake_datasets, capsys):
    features = {
        "premise": FakeValue("string"), "hypothesis": FakeValue("string"),
        "label": FakeClassLabel(["entailment", "neutral", "contradiction"]), "idx": FakeValue("int32"),
    }

    def row(i, label):
        return {"premise": f"a man sleeps {i}", "hypothesis": f"a man is awake {i}", "label": label, "idx": i}

    fake_datasets.overrides["mnli"] = {
        "train": FakeSplit([row(i, i % 3) for i in range(9)], features),
        "validation_matched": FakeSplit([row(i, i % 3) for i in range(3)], features),
        "validation_mismatched": FakeSplit([row(i, 2 - i % 3) for i in range(4)], features),
        "test_matched": FakeSplit([row(i, -1) for i in range(2)], features),
    }
    splits = load_splits(hub_config("mnli"), seed=0)
    assert splits.train.texts[0] == "a man sleeps 0" and splits.train.pairs[0] == "a man is awake 0"
    assert len(splits.validation) == 3 and splits.test is None
    assert task_label_map("classification", splits.train).names == ("entailment", "neutral", "contradiction")
    assert "validation_matched" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    "first, second",
    [("question", "sentence"), ("premise", "hypothesis"), ("question1", "question2"), ("sentence1", "sentence2")],
)
def test_glue_pair_columns_are_recognised(tmp_path, first, second):
    rows = [["0", "what is it?", "it is a cat.", "1"]]
    path = write_csv(tmp_path / "pairs.csv", ["idx", first, second, "label"], rows)
    examples = read_examples(str(path), DataConfig())
    assert examples.texts == ["what is it?"] and examples.pairs == ["it is a cat."]
    assert examples.columns == (first, second, "label")


def test_an_unused_text_column_is_warned_once_in_one_line(tmp_path, capsys):
    path = write_csv(
        tmp_path / "train.csv", ["id", "sentence", "comment", "label"],
        [["7", "a fine film", "seen it twice, loved it", "1"], ["8", "a dull film", "walked out early", "0"]],
    )
    read_examples(str(path), DataConfig())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and str(path) in lines[0] and "'comment'" in lines[0] and "'id'" not in lines[0]
    read_examples(str(path), DataConfig(text_column="sentence", text_pair_column="comment"))
    read_examples(str(shared_path("glue", "MRPC", "test.tsv")), DataConfig(
        text_column="#1 String", text_pair_column="#2 String", label_column="Quality"))
    read_examples(str(shared_path("glue", "STS-B", "dev.tsv")), DataConfig(label_column="score"))
    assert capsys.readouterr().err == ""


def test_headerless_file_of_three_columns_needs_its_text_columns(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("1\tnice one\t1\n2\tawful\t0\n")
    with pytest.raises(DataError, match=r"train.tsv: 3 columns and no header.*--text_column") as info:
        read_examples(str(path), DataConfig(no_header=True))
    assert "\n" not in str(info.value)
    examples = read_examples(str(path), DataConfig(no_header=True, text_column="1"))
    assert examples.texts == ["nice one", "awful"] and examples.pairs is None and examples.labels == ["1", "0"]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a cat\ta dog\t0\n")
    examples = read_examples(str(pairs), DataConfig(no_header=True, text_column="0", text_pair_column="1"))
    assert examples.texts == ["a cat"] and examples.pairs == ["a dog"]
    label_first = tmp_path / "label_first.tsv"
    label_first.write_text("1\tnice one\n0\tawful\n")
    examples = read_examples(str(label_first), DataConfig(no_header=True, label_column="0"))
    assert examples.texts == ["nice one", "awful"] and examples.labels == ["1", "0"]


def test_splits_report_the_columns_they_were_read_from(tmp_path):
    train = str(shared_path("glue", "STS-B", "dev.tsv"))
    splits = load_splits(DataConfig(train_file=train, label_column="score"), seed=0, stratify=False)
    expected = {"text_column": "sentence1", "text_pair_column": "sentence2", "label_column": "score"}
    assert read_columns(splits) == expected
    sst2 = load_splits(DataConfig(train_file=str(shared_path("glue", "SST-2", "dev.tsv"))), seed=0)
    assert read_columns(sst2) == {"text_column": "sentence", "text_pair_column": None, "label_column": "label"}
    other = write_csv(tmp_path / "dev.csv", ["text", "label"], [["fine", "1"], ["dull", "0"]])
    sst2_dev = str(shared_path("glue", "SST-2", "dev.tsv"))
    mixed = load_splits(DataConfig(train_file=sst2_dev, validation_file=str(other)), seed=0)
    assert read_columns(mixed) == {}
