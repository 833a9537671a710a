"""Extractive question answering (SQuAD): the answer's start and end token in a context.

Without TensorFlow: read questions, cut each question + context into overlapping token windows,
decode start/end logits back to a span of the context, and score answers as the official SQuAD
scripts do; the `QuestionAnswering` task at the end ties them to the pipeline's stages.

Training and the ONNX Predictor share this module, so the windows a model was trained on and the
windows it is served with cannot drift apart. Windows follow transformers' run_qa.py (question
first, context truncated with a stride); decoding follows its utils_qa.py; metrics follow the
official SQuAD v1.1 / v2.0 evaluation scripts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tfsft.errors import DataError
from tfsft.tasks.base import Task, invalid_setting, log_softmax
from tfsft.tokenize import EncodedTexts, TextEncoder

if TYPE_CHECKING:
    from tfsft.config import DataConfig
    from tfsft.data import LabelMap

QUESTION_COLUMN = "question"
CONTEXT_COLUMN = "context"
ANSWERS_COLUMN = "answers"
ID_COLUMN = "id"
ANSWER_TEXT_COLUMN = "answer_text"
ANSWER_START_COLUMN = "answer_start"
"""CSV/TSV columns of one gold answer (a blank answer_text: no answer)."""
DEFAULT_DOC_STRIDE = 128
DEFAULT_MAX_ANSWER_LENGTH = 30
DEFAULT_N_BEST = 20
MAX_QUESTION_TOKENS = 64
DECODE_CHUNK = 2048
"""Windows decoded per vectorised step: bounds the (windows, width) score arrays in memory."""


# ------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class QAExamples:
    """Questions with their contexts and gold answers, as (text, character start) in the context."""

    ids: list[str]
    questions: list[str]
    contexts: list[str]
    answers: list[list[tuple[str, int]]]
    """Per question; [] means unanswerable (SQuAD v2) or unknown (prediction only). Every answer
    satisfies context[start:start + len(text)] == text."""
    source: str = ""
    pairs: None = None
    """No sentence pairs (code shared with the text tasks checks that splits agree on pairs)."""

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, indices: Sequence[int]) -> "QAExamples":
        return QAExamples(
            ids=[self.ids[i] for i in indices],
            questions=[self.questions[i] for i in indices],
            contexts=[self.contexts[i] for i in indices],
            answers=[self.answers[i] for i in indices],
            source=self.source,
        )

    @property
    def texts(self) -> list[str]:
        """The questions: what code shared with the other tasks logs as an example's text."""
        return self.questions

    def answer_texts(self) -> list[list[str]]:
        return [[text for text, _ in answers] for answers in self.answers]


def read_qa_examples(
    path: str,
    question_column: str = QUESTION_COLUMN,
    context_column: str = CONTEXT_COLUMN,
    answers_column: str = ANSWERS_COLUMN,
) -> QAExamples:
    """Read the official SQuAD JSON, JSONL rows as in the Hub's `squad`, or a CSV/TSV with
    question, context and optional answer_text/answer_start columns.

    The column names apply to JSONL and CSV/TSV; the SQuAD JSON layout fixes its own.
    """
    from tfsft.data import _check_path, _decode, file_format, parse_json_record, read_records

    p = _check_path(path)
    if file_format(path) != "jsonl":
        columns, records = read_records(path)
        return _delimited_examples(path, columns, records, question_column, context_column)
    text = _decode(p)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    try:
        document = json.loads(text)
    except ValueError as error:
        document = None
        first_line = text.lstrip().split("\n", 1)[0]
        if Path(path).suffix.lower() == ".json" and not _is_json_object(first_line):
            raise DataError(f"{path}: malformed JSON ({error})") from None
    if isinstance(document, dict) and "data" in document:
        return _squad_examples(path, document)
    if isinstance(document, list):
        raise DataError(f"{path}: expected the SQuAD JSON object with 'data', or JSON Lines with one question per row")
    records = [
        (number, parse_json_record(path, number, line))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    return _json_row_examples(path, records, question_column, context_column, answers_column)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class _Collector:
    """Validates questions one at a time into the lists of a QAExamples."""

    def __init__(self, source: str):
        self.source = source
        self.ids: list[str] = []
        self.questions: list[str] = []
        self.contexts: list[str] = []
        self.answers: list[list[tuple[str, int]]] = []

    def add(self, where: str, qid: Any, question: Any, context: Any, answers: list[tuple[Any, Any]],
            fields: tuple[str, str, str]) -> None:
        """`answers`: raw (text, start) pairs; `fields`: the question, context and answers field
        names for messages."""
        question = self._text(where, question, fields[0])
        context = self._text(where, context, fields[1])
        checked = [self._answer(where, context, text, start, fields[2]) for text, start in answers]
        self.ids.append(str(qid))
        self.questions.append(question)
        self.contexts.append(context)
        self.answers.append(checked)

    def _text(self, where: str, value: Any, field: str) -> str:
        if value is None:
            raise DataError(f"{self.source}: {where}: missing field {field!r}")
        if not isinstance(value, str):
            raise DataError(f"{self.source}: {where}: field {field!r} is a {type(value).__name__}, not a string")
        if not value.strip():
            raise DataError(f"{self.source}: {where}: empty {field!r}")
        return value

    def _answer(self, where: str, context: str, text: Any, start: Any, field: str) -> tuple[str, int]:
        """(text, start) as found in the context. A difference in surrounding whitespace is
        tolerated (the stored text is stripped and the start moved onto it), as run_qa never
        compares the two; any other mismatch is an error."""
        if not isinstance(text, str) or not text.strip():
            raise DataError(
                f"{self.source}: {where}: field {field!r}: answer text must be a non-empty string, found {text!r}"
            )
        if isinstance(start, str) and re.fullmatch(r"\s*[+-]?\d+\s*", start):
            start = int(start)
        if not isinstance(start, int) or isinstance(start, bool):
            raise DataError(
                f"{self.source}: {where}: field {field!r}: answer_start must be an integer, found {start!r}"
            )
        stripped = text.strip()
        found = _find_near(context, stripped, start + len(text) - len(text.lstrip()))
        if found is None:
            seen = context[max(start, 0) : max(start, 0) + len(text)]
            raise DataError(
                f"{self.source}: {where}: field {field!r}: answer {text!r} is not at answer_start {start} "
                f"of the context (it reads {seen!r} there)"
            )
        return stripped, found

    def examples(self) -> QAExamples:
        if not self.questions:
            raise DataError(f"{self.source}: no questions found")
        return QAExamples(self.ids, self.questions, self.contexts, self.answers, self.source)


def _find_near(context: str, text: str, start: int) -> Optional[int]:
    """Where `text` occurs at `start`, or only whitespace away from it."""
    if not 0 <= start <= len(context):
        return None
    if context.startswith(text, start):
        return start
    after = start
    while after < len(context) and context[after].isspace():
        after += 1
    if context.startswith(text, after):
        return after
    before = start
    while before > 0 and context[before - 1].isspace():
        before -= 1
    if before != start and context.startswith(text, before):
        return before
    return None


def _squad_examples(path: str, document: dict) -> QAExamples:
    collector = _Collector(path)
    articles = document["data"]
    if not isinstance(articles, list):
        raise DataError(f"{path}: field 'data' must be a list of articles, found {type(articles).__name__}")
    fields = ("question", "context", "answers")
    number = 0
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: data[{a}]: missing list field 'paragraphs'")
        for p, paragraph in enumerate(paragraphs):
            place = f"data[{a}].paragraphs[{p}]"
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise DataError(f"{path}: {place}: missing list field 'qas'")
            context = paragraph.get("context")
            for q, qa in enumerate(qas):
                number += 1
                if not isinstance(qa, dict):
                    raise DataError(f"{path}: {place}.qas[{q}]: expected an object, found {type(qa).__name__}")
                qid = qa.get(ID_COLUMN, str(number))
                where = f"question id {qid} ({place}.qas[{q}])"
                answers = _answer_pairs(path, where, qa.get("answers"), "answers")
                collector.add(where, qid, qa.get("question"), context, answers, fields)
    return collector.examples()


def examples_from_records(
    records: list[tuple[int, dict]],
    source: str,
    question_column: str = QUESTION_COLUMN,
    context_column: str = CONTEXT_COLUMN,
    answers_column: str = ANSWERS_COLUMN,
) -> QAExamples:
    """Questions from (row number, row) records laid out as the Hub's `squad` rows (a loaded data set)."""
    return _json_row_examples(source, records, question_column, context_column, answers_column)


def _json_row_examples(path: str, records: list[tuple[int, dict]], question_column: str, context_column: str,
                       answers_column: str) -> QAExamples:
    collector = _Collector(path)
    fields = (question_column, context_column, answers_column)
    for number, record in records:
        where = f"row {number}"
        answers = _answer_pairs(path, where, record.get(answers_column), answers_column)
        collector.add(where, record.get(ID_COLUMN, number), record.get(question_column), record.get(context_column),
                      answers, fields)
    return collector.examples()


def _answer_pairs(path: str, where: str, value: Any, field: str) -> list[tuple[Any, Any]]:
    """Raw (text, start) pairs of an answers field: the Hub's {"text": [...], "answer_start": [...]}
    or SQuAD's [{"text", "answer_start"}, ...]; missing means no answer."""
    if value is None:
        return []
    if isinstance(value, dict):
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(
                f"{path}: {where}: field {field!r} must hold lists 'text' and 'answer_start' of equal length"
            )
        return list(zip(texts, starts))
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return [(item.get("text"), item.get("answer_start")) for item in value]
    raise DataError(
        f"{path}: {where}: field {field!r} must be {{'text': [...], 'answer_start': [...]}} or a list of "
        f"{{'text', 'answer_start'}} objects, found {type(value).__name__}"
    )


def _delimited_examples(path: str, columns: list[str], records: list[tuple[int, dict]], question_column: str,
                        context_column: str) -> QAExamples:
    for column in (question_column, context_column):
        if column not in columns:
            raise DataError(f"{path}: row 1: no column {column!r} in the header {columns}")
    answer_columns = [c for c in (ANSWER_TEXT_COLUMN, ANSWER_START_COLUMN) if c in columns]
    if len(answer_columns) == 1:
        missing = ({ANSWER_TEXT_COLUMN, ANSWER_START_COLUMN} - set(answer_columns)).pop()
        raise DataError(f"{path}: row 1: column {answer_columns[0]!r} needs a column {missing!r} too")
    collector = _Collector(path)
    fields = (question_column, context_column, f"{ANSWER_TEXT_COLUMN}/{ANSWER_START_COLUMN}")
    for number, record in records:
        text = record.get(ANSWER_TEXT_COLUMN) or ""
        answers = [(text, record[ANSWER_START_COLUMN])] if text.strip() else []
        collector.add(f"row {number}", record.get(ID_COLUMN) or number, record[question_column],
                      record[context_column], answers, fields)
    return collector.examples()


# -------------------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class QAWindows:
    """Token windows of question + context: one model input each, several per long context."""

    encoded: EncodedTexts
    example_index: np.ndarray
    """int64 (n_windows,): the question each window belongs to."""
    offsets: list[np.ndarray]
    """Per window, int64 (length, 2): character [start, end) of each token in the context;
    (-1, -1) for question, special and padding tokens."""
    positions: np.ndarray
    """int32 (n_windows, 2): start and end token of the first gold answer in the window; (0, 0)
    (the [CLS] token) when the window does not hold the whole answer or there is none."""

    def __len__(self) -> int:
        return len(self.encoded)

    def subset(self, indices: Sequence[int]) -> "QAWindows":
        index = np.asarray(indices, dtype=np.int64)
        return QAWindows(
            encoded=self.encoded.subset(indices),
            example_index=self.example_index[index],
            offsets=[self.offsets[i] for i in indices],
            positions=self.positions[index],
        )


@dataclass(frozen=True)
class _PairTemplate:
    """Where the tokenizer's post-processor puts special tokens around a (question, context) pair."""

    before: np.ndarray
    between: np.ndarray
    after: np.ndarray
    before_types: np.ndarray
    between_types: np.ndarray
    after_types: np.ndarray
    question_type: int
    context_type: int

    @property
    def specials(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)


def _pair_template(tokenizer) -> _PairTemplate:
    """Read the special-token layout off one post-processed pair, so windows can be assembled
    from token arrays: encoding a pair is encoding both texts alone, then this post-processing."""
    first = tokenizer.encode("a b", add_special_tokens=False)
    second = tokenizer.encode("a b", add_special_tokens=False)
    if not len(first.ids):
        raise ValueError("the tokenizer encodes 'a b' as no tokens")
    pair = tokenizer.post_process(first, second, add_special_tokens=True)
    ids = np.asarray(pair.ids, dtype=np.int32)
    types = np.asarray(pair.type_ids, dtype=np.int32)
    content = np.flatnonzero(np.asarray(pair.special_tokens_mask) == 0)
    n = len(first.ids)
    question, context = content[:n], content[n:]
    if len(context) != len(second.ids) or np.any(np.diff(question) != 1) or np.any(np.diff(context) != 1):
        raise ValueError("the tokenizer's post-processor does not lay out a pair as 'specials A specials B specials'")
    spans = [slice(0, question[0]), slice(question[-1] + 1, context[0]), slice(context[-1] + 1, len(ids))]
    return _PairTemplate(
        *[ids[s] for s in spans], *[types[s] for s in spans],
        question_type=int(types[question[0]]), context_type=int(types[context[0]]),
    )


def _answer_tokens(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """First and last context token overlapping the characters [start, end), or (-1, -1).

    The tokens run_qa's search finds (the token holding `start`, the one holding `end - 1`; of
    a character split into several byte-level tokens, all of them), and still right when an
    answer starts or ends on whitespace that no token covers.
    """
    inside = np.flatnonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))
    if not len(inside):
        return -1, -1
    return int(inside[0]), int(inside[-1])


def make_windows(
    encoder: TextEncoder,
    examples: QAExamples,
    doc_stride: int = DEFAULT_DOC_STRIDE,
    max_question_tokens: int = MAX_QUESTION_TOKENS,
) -> QAWindows:
    """Question + context windows of at most `encoder.max_length` tokens, the context cut into
    pieces overlapping by `doc_stride` tokens (the tokenizers library's `only_second` truncation
    with `stride`, as run_qa), with the gold answer's token positions for training.

    Each distinct context is tokenized once (SQuAD asks about five questions per paragraph), and
    windows are assembled from token arrays and the tokenizer's pair template. Questions lose
    leading whitespace and are cut to `max_question_tokens` (at most half the window), so every
    window has room for context. A `doc_stride` that leaves no room to advance is lowered to the
    largest that does, with a warning.
    """
    if doc_stride < 0:
        raise ValueError(f"doc_stride must not be negative. Received: doc_stride={doc_stride}")
    tokenizer = encoder.untruncated
    template = _pair_template(tokenizer)
    room = encoder.max_length - template.specials
    if room < 2:
        raise ValueError(f"max_length={encoder.max_length} leaves no room for a question and a context")
    question_cap = max(1, min(int(max_question_tokens), room // 2))
    questions = tokenizer.encode_batch([q.lstrip() for q in examples.questions], add_special_tokens=False)
    unique: dict[str, int] = {}
    context_of = np.asarray([unique.setdefault(c, len(unique)) for c in examples.contexts], dtype=np.int64)
    contexts = tokenizer.encode_batch(list(unique), add_special_tokens=False)
    context_ids = [np.asarray(e.ids, dtype=np.int32) for e in contexts]
    context_offsets = [np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2) for e in contexts]

    input_ids: list[np.ndarray] = []
    type_ids: list[np.ndarray] = []
    offsets: list[np.ndarray] = []
    example_index: list[int] = []
    positions: list[tuple[int, int]] = []
    lowered = 0
    for i, (question, c) in enumerate(zip(questions, context_of)):
        q_ids = np.asarray(question.ids[:question_cap], dtype=np.int32)
        head_ids = np.concatenate([template.before, q_ids, template.between])
        head_types = np.concatenate(
            [template.before_types, np.full(len(q_ids), template.question_type, np.int32), template.between_types]
        )
        ids, spans = context_ids[c], context_offsets[c]
        width = room - len(q_ids)
        stride = min(int(doc_stride), width - 1)
        lowered += stride < doc_stride
        answer = (-1, -1)
        if examples.answers[i]:
            text, start = examples.answers[i][0]
            answer = _answer_tokens(spans, start, start + len(text))
        first = 0
        while True:
            last = min(first + width, len(ids))
            window_offsets = np.full((len(head_ids) + last - first + len(template.after), 2), -1, dtype=np.int64)
            window_offsets[len(head_ids) : len(head_ids) + last - first] = spans[first:last]
            input_ids.append(np.concatenate([head_ids, ids[first:last], template.after]))
            type_ids.append(np.concatenate([
                head_types, np.full(last - first, template.context_type, np.int32), template.after_types,
            ]))
            offsets.append(window_offsets)
            example_index.append(i)
            if answer[0] >= first and 0 <= answer[1] < last:
                positions.append((len(head_ids) + answer[0] - first, len(head_ids) + answer[1] - first))
            else:
                positions.append((0, 0))
            if last >= len(ids):
                break
            first += width - stride
    if lowered:
        warnings.warn(
            f"{examples.source or 'QA examples'}: doc_stride={doc_stride} leaves no room to advance windows of "
            f"max_length={encoder.max_length} for {lowered} question(s); used the largest stride that fits",
            stacklevel=2,
        )
    lengths = np.asarray([len(x) for x in input_ids], dtype=np.int32)
    return QAWindows(
        encoded=EncodedTexts(input_ids, type_ids, lengths, np.zeros(len(input_ids), dtype=bool)),
        example_index=np.asarray(example_index, dtype=np.int64),
        offsets=offsets,
        positions=np.asarray(positions, dtype=np.int32).reshape(-1, 2),
    )


# ------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class SpanPrediction:
    """The answer to one question: a span of its context and its logit scores."""

    answer: str
    start: int
    end: int
    """Character offsets [start, end) into the context; answer == context[start:end]."""
    score: float
    """start + end logit of the span; for a "no answer" chosen by the null threshold, the null score."""
    null_score: float
    """The [CLS] score (start[0] + end[0]), the lowest over the question's windows (as utils_qa)."""

    def to_dict(self) -> dict:
        return {"answer": self.answer, "start": self.start, "end": self.end, "score": self.score}


def apply_null_threshold(prediction: SpanPrediction, null_threshold: float) -> SpanPrediction:
    """`prediction` (decoded without a threshold) as decoded with `null_threshold`: "" at the
    null score when that beats the span's score by more than the threshold."""
    if prediction.answer and prediction.null_score - prediction.score > null_threshold:
        return SpanPrediction("", 0, 0, prediction.null_score, prediction.null_score)
    return prediction


def best_spans(
    logits: np.ndarray | list[np.ndarray],
    windows: QAWindows,
    examples: QAExamples,
    n_best: int = DEFAULT_N_BEST,
    max_answer_length: int = DEFAULT_MAX_ANSWER_LENGTH,
    null_threshold: Optional[float] = None,
) -> list[SpanPrediction]:
    """Best context span per question over all its windows (utils_qa's postprocess_qa_predictions).

    `logits`: (n_windows, width, 2) start/end logits (columns past a window's length are
    padding) or one (length, 2) array per window. Per window, the `n_best` best starts and ends
    among context tokens are paired; a pair counts if start <= end and it spans at most
    `max_answer_length` tokens. Without a valid span (or without windows) the answer is "" at 0
    with score 0.0, as utils_qa's "empty" prediction. With `null_threshold` (SQuAD v2), the answer
    is "" when null_score - score > null_threshold.
    """
    n_windows = len(windows)
    if len(logits) != n_windows:
        raise ValueError(f"{len(logits)} logit rows for {n_windows} windows")
    scores = np.full(n_windows, -np.inf)
    starts = np.zeros(n_windows, dtype=np.int64)
    ends = np.zeros(n_windows, dtype=np.int64)
    nulls = np.full(n_windows, np.inf)
    for first in range(0, n_windows, DECODE_CHUNK):
        chunk = range(first, min(first + DECODE_CHUNK, n_windows))
        block = _logit_block(logits, chunk, windows)
        mask = np.zeros(block.shape[:2], dtype=bool)
        for row, w in enumerate(chunk):
            mask[row, : len(windows.offsets[w])] = windows.offsets[w][:, 0] >= 0
        s, e, score = _best_in_windows(block, mask, n_best, max_answer_length)
        scores[chunk.start : chunk.stop], starts[chunk.start : chunk.stop], ends[chunk.start : chunk.stop] = score, s, e
        nulls[chunk.start : chunk.stop] = block[:, 0, 0] + block[:, 0, 1]

    order = np.lexsort((-scores, windows.example_index))
    examples_seen, first_window = np.unique(windows.example_index[order], return_index=True)
    best_window = dict(zip(examples_seen.tolist(), order[first_window].tolist()))
    null_scores = np.full(len(examples), np.inf)
    np.minimum.at(null_scores, windows.example_index, nulls)

    predictions = []
    for i, context in enumerate(examples.contexts):
        w = best_window.get(i)
        null_score = float(null_scores[i]) if np.isfinite(null_scores[i]) else 0.0
        if w is None or not np.isfinite(scores[w]):
            predictions.append(SpanPrediction("", 0, 0, 0.0, null_score))
            continue
        score = float(scores[w])
        if null_threshold is not None and null_score - score > null_threshold:
            predictions.append(SpanPrediction("", 0, 0, null_score, null_score))
            continue
        offsets = windows.offsets[w]
        start, end = int(offsets[starts[w], 0]), int(offsets[ends[w], 1])
        start, end = _strip_span(context, start, max(start, end))
        predictions.append(SpanPrediction(context[start:end], start, end, score, null_score))
    return predictions


def _logit_block(logits: np.ndarray | list[np.ndarray], chunk: range, windows: QAWindows) -> np.ndarray:
    """(windows, width, 2) float64 logits of the windows in `chunk`; -inf past each window's end."""
    lengths = windows.encoded.lengths[chunk.start : chunk.stop]
    if isinstance(logits, np.ndarray) and logits.ndim == 3:
        block = np.asarray(logits[chunk.start : chunk.stop], dtype=np.float64)
        if block.shape[1] < int(lengths.max()):
            raise ValueError(f"logits are {block.shape[1]} tokens wide, but a window has {int(lengths.max())} tokens")
        return block
    rows = [np.asarray(logits[w], dtype=np.float64).reshape(-1, 2) for w in chunk]
    block = np.full((len(rows), max(len(r) for r in rows), 2), -np.inf)
    for row, (values, length) in enumerate(zip(rows, lengths)):
        if len(values) < length:
            raise ValueError(f"window {chunk.start + row} has {length} tokens but {len(values)} logit rows")
        block[row, : len(values)] = values
    return block


def _best_in_windows(block: np.ndarray, mask: np.ndarray, n_best: int, max_answer_length: int):
    """Per window, the best valid (start, end) among its n_best starts and ends: token indices and
    score (-inf where no pair is valid)."""
    start_logits = np.where(mask, block[:, :, 0], -np.inf)
    end_logits = np.where(mask, block[:, :, 1], -np.inf)
    k = max(1, min(int(n_best), block.shape[1]))
    top_starts = np.argpartition(-start_logits, k - 1, axis=1)[:, :k]
    top_ends = np.argpartition(-end_logits, k - 1, axis=1)[:, :k]
    pair_scores = (
        np.take_along_axis(start_logits, top_starts, axis=1)[:, :, None]
        + np.take_along_axis(end_logits, top_ends, axis=1)[:, None, :]
    )
    length = top_ends[:, None, :] - top_starts[:, :, None]
    valid = (length >= 0) & (length < max_answer_length) & np.isfinite(pair_scores)
    pair_scores = np.where(valid, pair_scores, -np.inf)
    flat = pair_scores.reshape(len(block), -1).argmax(axis=1)
    rows = np.arange(len(block))
    return top_starts[rows, flat // k], top_ends[rows, flat % k], pair_scores.reshape(len(block), -1)[rows, flat]


def _strip_span(context: str, start: int, end: int) -> tuple[int, int]:
    """Move a span's ends off whitespace: byte-level BPE tokens carry the space before a word."""
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


# -------------------------------------------------------------------------------------- metrics


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised words. Two answers without words agree (1.0); one alone scores 0.0,
    as in the official v2 script."""
    return _normalized_f1(normalize_answer(prediction), normalize_answer(gold))


def _normalized_f1(prediction: str, gold: str) -> float:
    predicted, expected = prediction.split(), gold.split()
    if not predicted or not expected:
        return float(predicted == expected)
    same = sum((Counter(predicted) & Counter(expected)).values())
    if not same:
        return 0.0
    precision, recall = same / len(predicted), same / len(expected)
    return 2 * precision * recall / (precision + recall)


def _question_scores(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction: the best over the gold answers; a question without
    gold answers (v2 unanswerable) expects "" (the official v2 rule)."""
    predicted = normalize_answer(prediction)
    expected = [g for g in map(normalize_answer, golds) if g] or [""]
    return float(predicted in expected), max(_normalized_f1(predicted, g) for g in expected)


def _has_answer(golds: Sequence[str]) -> bool:
    return any(normalize_answer(g) for g in golds)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}: means over questions, as fractions in [0, 1] (the official scripts
    print percentages)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    scores = np.asarray([_question_scores(p, g) for p, g in zip(predictions, golds)])
    return {"exact_match": float(scores[:, 0].mean()), "f1": float(scores[:, 1].mean())}


def squad_v2_scores(
    predictions: Sequence[SpanPrediction], golds: Sequence[Sequence[str]]
) -> tuple[dict[str, float], float]:
    """Scores at the null threshold that maximises F1 (the official v2 `best_f1_thresh`), and that
    threshold: a question gets "" when null_score - score > threshold.

    `predictions` must come from `best_spans` without a threshold (each holds its best span).
    The has_ans_* / no_ans_* keys are left out when there are no such questions, as the
    official script leaves out HasAns / NoAns.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    has_answer = np.asarray([_has_answer(g) for g in golds])
    f1_answered = np.asarray([_question_scores(p.answer, g)[1] for p, g in zip(predictions, golds)])
    f1_null = np.asarray([_question_scores("", g)[1] for g in golds])
    gaps = np.asarray([p.null_score - p.score for p in predictions], dtype=np.float64)
    order = np.argsort(gaps, kind="stable")
    totals = f1_null.sum() + np.concatenate([[0.0], np.cumsum((f1_answered - f1_null)[order])])
    sorted_gaps = gaps[order]
    cut = np.r_[True, sorted_gaps[1:] != sorted_gaps[:-1], True]
    candidates = np.flatnonzero(cut)
    best = int(candidates[np.argmax(totals[candidates])])
    threshold = float(sorted_gaps[best - 1]) if best else float(sorted_gaps[0]) - 1.0
    final = ["" if gap > threshold else p.answer for p, gap in zip(predictions, gaps)]
    per_question = np.asarray([_question_scores(p, g) for p, g in zip(final, golds)])
    metrics = {"exact_match": float(per_question[:, 0].mean()), "f1": float(per_question[:, 1].mean())}
    for prefix, group in (("has_ans", has_answer), ("no_ans", ~has_answer)):
        if group.any():
            metrics[f"{prefix}_exact_match"] = float(per_question[group, 0].mean())
            metrics[f"{prefix}_f1"] = float(per_question[group, 1].mean())
    metrics["best_f1_threshold"] = threshold
    return metrics, threshold


# ------------------------------------------------------------------------------------ the task


SPAN_OUTPUTS = ("start", "end")
"""The two outputs per token of a span head: the answer's first and last token."""


@dataclass(frozen=True)
class Answer:
    """The answer a question-answering bundle found in a context: `answer == context[start:end]`
    (character offsets), `score` the start plus end logit of the span ("" with no answer)."""

    answer: str
    start: int
    end: int
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.answer, "start": self.start, "end": self.end, "score": self.score}

    def csv_fields(self, labels: Sequence[str]) -> list[str]:
        return [self.answer, str(self.start), str(self.end), f"{self.score:.6g}"]


@dataclass(frozen=True)
class SpanReference:
    """What question-answering logits are scored against: the questions with their gold
    answers (`QAExamples`), their windows (`QAWindows`, in the logits' row order), and
    the run's decoding settings (n_best_size, max_answer_length, version_2_with_negative)."""

    examples: Any
    windows: Any
    settings: "DataConfig"


def span_reference(encoder: Any, examples: Any, settings: "DataConfig") -> SpanReference:
    """Question-answering examples cut into their windows (`settings.doc_stride`), with what
    scores them: the windows' `encoded` and `positions` are the model's inputs and labels."""
    return SpanReference(examples, make_windows(encoder, examples, settings.doc_stride), settings)


def span_loss(logits: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> float:
    """Mean over windows of the start and end cross-entropies, each over the window's own tokens."""
    total = 0.0
    for row, (start, end) in enumerate(np.asarray(positions)):
        own = np.asarray(logits[row, : lengths[row]], dtype=np.float64)
        log_probabilities = log_softmax(own.T)
        total += -(log_probabilities[0, start] + log_probabilities[1, end]) / 2.0
    return total / max(len(positions), 1)


def span_metrics(
    reference: SpanReference, logits: np.ndarray, label_map: "LabelMap", prefix: str = "eval",
    null_threshold: Optional[float] = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """SQuAD exact match and F1 (official normalisation, as fractions) of the best span of each
    question over all its windows, and the windows' span loss.

    SQuAD v2 data (`version_2_with_negative`): a question gets "" when its null score beats its
    best span's by more than the null threshold. Without `null_threshold` the threshold with the
    best F1 on these questions is chosen (on validation only, as the official v2 script's best_f1
    does): it is the decision shipped (report["decision"]) and the test set's threshold, and the
    scores taken at it are in-sample. With it (the test set, a saved run) the scores are at it.
    """
    examples, windows, settings = reference.examples, reference.windows, reference.settings
    spans = best_spans(
        logits, windows, examples, n_best=settings.n_best_size, max_answer_length=settings.max_answer_length
    )
    golds = examples.answer_texts()
    metrics: dict[str, Any] = {f"{prefix}_loss": span_loss(logits, windows.positions, windows.encoded.lengths)}
    report: dict[str, Any] = {}
    answered = spans
    if settings.version_2_with_negative:
        if null_threshold is None:
            _, null_threshold = squad_v2_scores(spans, golds)
            selection = "tuned on these questions (in-sample): the threshold with the best F1"
        else:
            selection = "fixed before scoring (chosen on validation)"
        answered = [apply_null_threshold(span, null_threshold) for span in spans]
        scores = _has_answer_scores([span.answer for span in answered], golds)
        metrics[f"{prefix}_null_threshold"] = float(null_threshold)
        report["decision"] = {"null_threshold": float(null_threshold)}
        report["threshold_selection"] = selection
    else:
        scores = squad_scores([span.answer for span in answered], golds)
    metrics.update({f"{prefix}_{name}": float(value) for name, value in scores.items()})
    metrics[f"{prefix}_samples"] = len(examples)
    metrics[f"{prefix}_windows"] = len(windows)
    report["predictions"] = [
        {"id": example_id, **span.to_dict()} for example_id, span in zip(examples.ids, answered)
    ]
    return metrics, report


def _has_answer_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD v2 scores: overall, and over the questions with and without an answer."""
    scores = squad_scores(predictions, golds)
    for name, keep in (("has_ans", [bool(g) for g in golds]), ("no_ans", [not g for g in golds])):
        chosen = [i for i, k in enumerate(keep) if k]
        if chosen:
            part = squad_scores([predictions[i] for i in chosen], [golds[i] for i in chosen])
            scores.update({f"{name}_{metric}": value for metric, value in part.items()})
    return scores


def span_training_loss(y_true, y_pred):
    """Mean of the start and end cross-entropies over each window's tokens (transformers' QA loss).
    `y_true`: [batch, 2] token positions of the answer's first and last token ([CLS], 0, when the
    window does not hold it); `y_pred`: [batch, length, 2] start and end logits."""
    from tfsft.modeling import tf

    positions = tf.cast(y_true, tf.int32)
    logits = tf.cast(y_pred, tf.float32)
    start = tf.keras.losses.sparse_categorical_crossentropy(positions[:, 0], logits[:, :, 0], from_logits=True)
    end = tf.keras.losses.sparse_categorical_crossentropy(positions[:, 1], logits[:, :, 1], from_logits=True)
    return (start + end) / 2.0


def question_context(item: Any, position: int) -> tuple[str, str]:
    """(question, context) of one question-answering input: a dict with both fields, or a pair."""
    if isinstance(item, dict):
        values = [item.get("question"), item.get("context")]
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        values = list(item)
    else:
        raise ValueError(
            f"input {position}: expected an object with 'question' and 'context' strings. Received: {item!r:.80}"
        )
    for name, value in zip(("question", "context"), values):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"input {position}: {name!r} must be a non-empty string. Received: {value!r:.60}")
    return values[0], values[1]


class QuestionAnswering(Task):
    name = "qa"
    summary = "extractive question answering: an answer span of a context (SQuAD)"
    best_metrics = ("f1", "exact_match", "loss")
    default_max_seq_length = 384
    label_counts = (2, 2)
    sequence_head = False
    input_fields = ("question", "context")
    windowed = True

    def check_data(self, data: "DataConfig") -> None:
        length = data.max_seq_length
        if data.doc_stride >= length // 2:
            raise invalid_setting(
                "doc_stride", data.doc_stride,
                f"fewer than half of --max_seq_length ({length}), so that windows advance through a long context",
            )

    def read(self, path: str, data: "DataConfig") -> Any:
        """Questions with their contexts and answers (`QAExamples`) from a SQuAD JSON,
        JSONL, CSV or TSV file."""
        return read_qa_examples(path, data.question_column, data.context_column, data.answers_column)

    def hub_splits(self, data: "DataConfig") -> dict[str, Any]:
        """Splits laid out as `squad` is (id, question, context, answers: {"text": [...], "answer_start": [...]})."""
        from tfsft.data import hub_qa_splits

        return hub_qa_splits(data)

    def check_splits(self, splits: Any, data: "DataConfig") -> None:
        """Without --version_2_with_negative every question of every split has an answer."""
        from tfsft.errors import DataError

        if data.version_2_with_negative:
            return
        for examples in (splits.train, splits.validation, splits.test):
            if examples is None:
                continue
            missing = next((i for i, answers in enumerate(examples.answers) if not answers), None)
            if missing is not None:
                raise DataError(
                    f"{examples.source}: question {examples.ids[missing]!r} has no answer; pass "
                    "--version_2_with_negative for data with unanswerable questions (SQuAD v2)"
                )

    def label_map(self, train: Any, delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap

        return LabelMap(SPAN_OUTPUTS)

    def encode_labels(self, label_map: "LabelMap", examples: Any, delimiter: str) -> np.ndarray:
        """How many gold answers each question has (the windows carry the positions the loss reads)."""
        return np.asarray([len(answers) for answers in examples.answers], dtype=np.int64)

    def encode(self, encoder: Any, examples: Any, labels: np.ndarray, data: "DataConfig") -> tuple[Any, np.ndarray, Any]:
        """The windows of each question, the answer's token positions in each, and the questions
        with their windows that the metrics decode and score."""
        reference = span_reference(encoder, examples, data)
        return reference.windows.encoded, reference.windows.positions, reference

    def reference_subset(self, reference: SpanReference, rows: np.ndarray) -> SpanReference:
        """The windows at `rows` and the questions they belong to (so a set scores only questions it has windows of)."""
        windows = reference.windows.subset(rows)
        questions = np.unique(windows.example_index)
        remapped = dataclasses.replace(windows, example_index=np.searchsorted(questions, windows.example_index))
        return SpanReference(reference.examples.subset(questions.tolist()), remapped, reference.settings)

    def describe(self, label_map: "LabelMap") -> str:
        return "questions"

    def head_class(self, pooling: str, model_type: str):
        from tfsft.modeling import StackedSpanModel

        return StackedSpanModel

    def objective(self) -> tuple[Any, list]:
        return span_training_loss, []

    def metrics(self, reference, logits, label_map, prefix, decision):
        return span_metrics(reference, logits, label_map, prefix, decision.get("null_threshold"))

    def agreement(self, candidate, reference, tolerance, threshold, token_labels, lengths) -> tuple[Optional[float], int]:
        """Per window, whether the most likely start and end tokens (over the window's own tokens,
        `lengths`) are the same; decided when each is more than 2 x tolerance ahead of the runner-up."""
        agrees, decided = [], []
        for row in range(len(reference)):
            width = int(lengths[row]) if lengths is not None else reference.shape[1]
            own, other = reference[row, :width], candidate[row, :width]
            top_two = np.sort(own, axis=0)[-2:]
            decided.append(bool(np.all(top_two[1] - top_two[0] > 2 * tolerance)))
            agrees.append(bool(np.array_equal(own.argmax(0), other.argmax(0))))
        decided_rows = np.asarray(decided, dtype=bool)
        count = int(decided_rows.sum())
        return (float(np.asarray(agrees)[decided_rows].mean()) if count else None), count

    def predict(self, predictor: Any, inputs: Sequence[Any]) -> list[Answer]:
        return predictor.predict_answers(inputs)

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        return ["answer", "start", "end", "score"]

    def request_error(self, key: str) -> Optional[str]:
        if key != "questions":
            return 'a question-answering model takes {"questions": [{"question": "...", "context": "..."}]}'
        return None

    def bundle_settings(self, data: "DataConfig") -> dict[str, Any]:
        """How the Predictor windows contexts and decodes answers: as the run's evaluation did."""
        return {
            "doc_stride": data.doc_stride, "max_answer_length": data.max_answer_length, "n_best_size": data.n_best_size,
            "version_2_with_negative": data.version_2_with_negative,
        }


TASK = QuestionAnswering()
