"""Named-entity recognition: one tag per word (CoNLL), entity spans with character offsets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tfsft.errors import DataError
from tfsft.tasks.base import IGNORED_LABEL, Task, json_safe, log_softmax, softmax, top_two_agreement

if TYPE_CHECKING:
    from tfsft.config import DataConfig
    from tfsft.data import LabelMap
    from tfsft.tokenize import EncodedTexts, TextEncoder


@dataclass(frozen=True)
class Entities:
    """The entity spans a tagging bundle found in one text, with character offsets into it.

    `truncated`: the text was longer than the bundle's max_seq_length, and the words past that
    limit were not tagged (no entity can come from them).
    """

    entities: list[dict[str, Any]]
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"entities": self.entities, "truncated": self.truncated}

    def csv_fields(self, labels: Sequence[str]) -> list[str]:
        return [json.dumps(self.entities, ensure_ascii=False), json.dumps(self.truncated)]


@dataclass(frozen=True)
class TokenExamples:
    """Pre-split words with one tag per word (token classification), and source rows for errors."""

    words: list[list[str]]
    labels: list[list[str]]
    rows: list[int]
    source: str
    pairs: None = None

    @property
    def texts(self) -> list[str]:
        return [" ".join(words) for words in self.words]

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, indices: Sequence[int]) -> "TokenExamples":
        return TokenExamples(
            words=[self.words[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            rows=[self.rows[i] for i in indices],
            source=self.source,
        )

    def encode(self, encoder: TextEncoder, labels: Optional[np.ndarray]) -> tuple[EncodedTexts, Optional[np.ndarray]]:
        """Word pieces of the words; each word's tag id goes to its first piece, IGNORED_LABEL elsewhere."""
        encoded, word_ids = encoder.encode_words(self.words)
        return encoded, None if labels is None else align_labels(word_ids, labels)


def align_labels(word_ids: Sequence[np.ndarray], word_labels: Sequence[np.ndarray]) -> np.ndarray:
    """Per-token label arrays (an object array, one per example) from per-word label ids."""
    out = np.empty(len(word_ids), dtype=object)
    for i, (words, tags) in enumerate(zip(word_ids, word_labels)):
        first = np.r_[True, words[1:] != words[:-1]] & (words >= 0)
        aligned = np.full(len(words), IGNORED_LABEL, dtype=np.int32)
        aligned[first] = np.asarray(tags, dtype=np.int32)[words[first]]
        out[i] = aligned
    return out


def read_token_examples(path: str, config: "DataConfig") -> TokenExamples:
    """CoNLL-style `token ... tag` lines (blank line between sentences, `-DOCSTART-` skipped) or
    JSONL `{"tokens": [...], "tags": [...]}` (--text_column / --label_column rename the fields)."""
    from tfsft.data import _check_path, _decode, _read_jsonl

    p = _check_path(path)
    if Path(path).suffix.lower() in {".jsonl", ".json", ".ndjson"}:
        _, records = _read_jsonl(path, _decode(p))
        return _token_records(records, config.text_column or "tokens", config.label_column or "tags", path)
    text = _decode(p)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    rows: list[int] = []
    sentence: list[str] = []
    sentence_tags: list[str] = []
    for number, line in enumerate([*text.splitlines(), ""], start=1):
        fields = line.split()
        if fields and fields[0] != "-DOCSTART-":
            if len(fields) < 2:
                raise DataError(f"{path}: row {number}: expected 'token ... tag' (at least two fields), found {line.strip()!r}")
            if not sentence:
                rows.append(number)
            sentence.append(fields[0])
            sentence_tags.append(fields[-1])
        elif sentence:
            words.append(sentence)
            tags.append(sentence_tags)
            sentence, sentence_tags = [], []
    if not words:
        raise DataError(f"{path}: no sentences found; expected CoNLL lines 'token ... tag' or JSONL with tokens and tags")
    return TokenExamples(words, tags, rows, path)


def _token_records(records: Sequence[tuple[int, dict[str, Any]]], tokens: str, tags: str, source: str) -> "TokenExamples":
    words, labels, rows = [], [], []
    for number, record in records:
        values = [record.get(tokens), record.get(tags)]
        for name, value in zip((tokens, tags), values):
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise DataError(f"{source}: row {number}: field {name!r} must be a non-empty list of non-empty strings")
        if len(values[0]) != len(values[1]):
            raise DataError(f"{source}: row {number}: {len(values[0])} tokens but {len(values[1])} tags")
        words.append(values[0])
        labels.append(values[1])
        rows.append(number)
    return TokenExamples(words, labels, rows, source)


def encode_tags(label_map: "LabelMap", examples: TokenExamples, delimiter: str = "") -> np.ndarray:
    """Per-word tag ids (an object array of int32 arrays); a tag unseen in training names its row."""
    from tfsft.errors import DataError

    out = np.empty(len(examples), dtype=object)
    for i, (tags, row) in enumerate(zip(examples.labels, examples.rows)):
        unknown = [tag for tag in tags if tag not in label_map.ids]
        if unknown:
            raise DataError(
                f"{examples.source}: row {row}: tag {unknown[0]!r} never appears in the training data "
                f"(known tags: {list(label_map.names)})"
            )
        out[i] = np.asarray([label_map.ids[tag] for tag in tags], dtype=np.int32)
    return out


def masked_token_loss(y_true, y_pred):
    """Cross-entropy averaged over labeled tokens only: IGNORED_LABEL (-100) marks special tokens,
    continuation word pieces and padding, which must not count (nor dilute the mean)."""
    from tfsft.modeling import tf

    mask = tf.not_equal(y_true, IGNORED_LABEL)
    labels = tf.where(mask, y_true, tf.zeros_like(y_true))
    losses = tf.keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
    weights = tf.cast(mask, losses.dtype)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def token_tags(labels: np.ndarray, logits: np.ndarray, label_map: "LabelMap") -> tuple[list[list[str]], list[list[str]]]:
    """(true, predicted) tag sequences over the labeled tokens (first word pieces) of each example."""
    true, predicted = [], []
    for values, scores in zip(labels, logits):
        keep = np.flatnonzero(np.asarray(values) != IGNORED_LABEL)
        true.append([label_map.names[i] for i in np.asarray(values)[keep]])
        predicted.append([label_map.names[i] for i in scores[keep].argmax(-1)])
    return true, predicted


def ner_metrics(
    labels: np.ndarray, logits: np.ndarray, label_map: "LabelMap", prefix: str = "eval"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL rules), token accuracy and the
    masked cross-entropy. `labels`: per-token label arrays with IGNORED_LABEL where not scored."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    true, predicted = token_tags(labels, logits, label_map)
    losses, hits, count = 0.0, 0, 0
    for values, scores in zip(labels, logits):
        keep = np.flatnonzero(np.asarray(values) != IGNORED_LABEL)
        gold = np.asarray(values)[keep]
        log_probabilities = log_softmax(scores[keep].astype(np.float64))
        losses += float(-log_probabilities[np.arange(len(keep)), gold].sum())
        hits += int((scores[keep].argmax(-1) == gold).sum())
        count += len(keep)
    metrics = {
        f"{prefix}_loss": losses / max(count, 1),
        f"{prefix}_precision": float(precision_score(true, predicted, zero_division=0)),
        f"{prefix}_recall": float(recall_score(true, predicted, zero_division=0)),
        f"{prefix}_f1": float(f1_score(true, predicted, zero_division=0)),
        f"{prefix}_token_accuracy": hits / max(count, 1),
        f"{prefix}_samples": int(len(labels)),
    }
    report = {
        "labels": list(label_map.names),
        "entities": json_safe(classification_report(true, predicted, output_dict=True, zero_division=0)),
    }
    return metrics, report


def scored_tokens(token_labels: Optional[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Boolean [examples, width]: the tokens whose tag is scored (IGNORED_LABEL elsewhere)."""
    scored = np.zeros(shape, dtype=bool)
    for row, values in enumerate(token_labels if token_labels is not None else ()):
        values = np.asarray(values)[: shape[1]]
        scored[row, : len(values)] = values != IGNORED_LABEL
    return scored


def word_tags(
    probabilities: np.ndarray, word_ids: np.ndarray, num_words: int, labels: Sequence[str]
) -> tuple[list[str], list[float]]:
    """The tag of each word from its first piece (as training labelled it). Words without a piece,
    those cut off by truncation among them, are tagged O (`Entities.truncated` says so)."""
    tags, scores = ["O"] * num_words, [0.0] * num_words
    previous = -1
    for position, word in enumerate(word_ids):
        if word >= 0 and word != previous and word < num_words:
            best = int(probabilities[position].argmax())
            tags[word], scores[word] = labels[best], float(probabilities[position, best])
        previous = word
    return tags, scores


def entity_spans(text: str, words: Sequence[tuple[str, int, int]], tags: Sequence[str], scores: Sequence[float]) -> list[dict[str, Any]]:
    """Word tags -> [{entity, start, end, text, score}] with character offsets into `text`; the
    spans are seqeval's (`tag_chunks`), the score the mean of their words' tag probabilities."""
    spans: list[dict[str, Any]] = []
    for kind, first, last in tag_chunks(tags):
        start, end = words[first][1], words[last][2]
        score = float(np.mean(scores[first : last + 1]))
        spans.append({"entity": kind, "start": start, "end": end, "text": text[start:end], "score": score})
    return spans


def tag_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word) of each entity in a tag sequence, exactly as seqeval's
    `get_entities` finds them (its default mode, which its metrics use in evaluation).

    IOB2, IOB1 (`I-` after `O` or another type opens an entity) and IOBES are read as seqeval reads
    them; so are BILOU and malformed tags, quirks included (consecutive `U-` tags of one type are
    one entity, as in seqeval). Kept here, without seqeval, so serving needs no training package;
    a test checks it against seqeval on thousands of tag sequences.
    """
    chunks: list[tuple[str, int, int]] = []
    previous_tag, previous_type, begin = "O", "", 0
    for position, chunk in enumerate([*tags, "O"]):
        tag = chunk[0]
        kind = chunk[1:].split("-", maxsplit=1)[-1] or "_"
        if _chunk_ends(previous_tag, tag, previous_type, kind):
            chunks.append((previous_type, begin, position - 1))
        if _chunk_starts(previous_tag, tag, previous_type, kind):
            begin = position
        previous_tag, previous_type = tag, kind
    return chunks


_ENDING_PAIRS = frozenset({("B", "B"), ("B", "S"), ("B", "O"), ("I", "B"), ("I", "S"), ("I", "O")})
_STARTING_PAIRS = frozenset({("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")})


def _chunk_ends(previous_tag: str, tag: str, previous_type: str, kind: str) -> bool:
    """seqeval's `end_of_chunk`: whether an entity ended before the current word."""
    return (
        previous_tag in ("E", "S")
        or (previous_tag, tag) in _ENDING_PAIRS
        or (previous_tag not in ("O", ".") and previous_type != kind)
    )


def _chunk_starts(previous_tag: str, tag: str, previous_type: str, kind: str) -> bool:
    """seqeval's `start_of_chunk`: whether an entity starts at the current word."""
    return (
        tag in ("B", "S")
        or (previous_tag, tag) in _STARTING_PAIRS
        or (tag not in ("O", ".") and previous_type != kind)
    )


class Ner(Task):
    name = "ner"
    summary = "one tag per word (CoNLL files or JSONL with tokens and tags)"
    best_metrics = ("f1", "precision", "recall", "loss")
    multitask = True
    sequence_head = False
    takes_pairs = False
    needs_train_file = True

    def read(self, path: str, data: "DataConfig") -> TokenExamples:
        return read_token_examples(path, data)

    def label_map(self, train: TokenExamples, delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap
        from tfsft.errors import DataError

        tags = {tag for sentence in train.labels for tag in sentence}
        if len(tags) < 2:
            raise DataError(f"{train.source}: only the tag(s) {sorted(tags)} in the training data; tagging needs at least two")
        return LabelMap(tuple(sorted(tags)))

    def encode_labels(self, label_map: "LabelMap", examples: TokenExamples, delimiter: str) -> np.ndarray:
        return encode_tags(label_map, examples, delimiter)

    def head_class(self, pooling: str, model_type: str):
        import transformers

        return transformers.TFAutoModelForTokenClassification

    def objective(self) -> tuple[Any, list]:
        return masked_token_loss, []

    def metrics(self, reference, logits, label_map, prefix, decision):
        return ner_metrics(reference, logits, label_map, prefix)

    def agreement(self, candidate, reference, tolerance, threshold, token_labels, lengths) -> tuple[Optional[float], int]:
        """Per scored token (the first word pieces `token_labels` marks), as classification agrees."""
        scored = scored_tokens(token_labels, reference.shape[:2])
        return top_two_agreement(candidate[scored], reference[scored], tolerance)

    def predict(self, predictor: Any, inputs: Sequence[Any]) -> list[Entities]:
        """Entity spans of each text: split into words as CoNLL text is (`split_words`), one tag per
        word from its first word piece, tags joined into spans as seqeval joins them in evaluation,
        with character offsets into the original text."""
        from tfsft.inference import split_inputs
        from tfsft.tokenize import pad_batch, split_words

        texts, pairs = split_inputs(inputs)
        if pairs is not None:
            raise ValueError("a tagging model takes single texts, not pairs")
        words = [split_words(text) for text in texts]
        encoder = predictor.encoder
        encoded, word_ids = encoder.encode_words([[w for w, _, _ in ws] or [""] for ws in words])
        results: list[Optional[Entities]] = [None] * len(texts)
        for indices in predictor.batches(encoded):
            probabilities = softmax(predictor.run(pad_batch(encoded, indices, encoder.pad_id)))
            for row, i in enumerate(indices):
                tags, scores = word_tags(probabilities[row], word_ids[i], len(words[i]), predictor.labels)
                spans = entity_spans(texts[i], words[i], tags, scores)
                results[i] = Entities(spans, truncated=bool(words[i]) and bool(encoded.truncated[i]))
        return results  # type: ignore[return-value]

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        return ["entities", "truncated"]

    def trained_columns(self, saved: dict[str, Any]) -> tuple[Optional[str], Optional[str]]:
        """None: a tagger trained on word lists, whose columns say nothing about the texts it tags."""
        return None, None


TASK = Ner()
