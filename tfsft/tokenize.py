"""Text (or text pairs) -> token id arrays with the `tokenizers` library; no TensorFlow.

Training and serving both call `TextEncoder` and `pad_batch`, so the two cannot drift apart.
Examples are kept unpadded (ragged); padding happens per batch, to the longest member.
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfsft.errors import ArtifactError

PAD_MULTIPLE = 1
"""Default padding granularity: exact per-batch padding (XLA runs pass 8 to bound its recompiles)."""


@dataclass(frozen=True)
class EncodedTexts:
    """Unpadded token ids of N examples, one int32 array per example."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    lengths: np.ndarray
    truncated: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)

    def subset(self, indices: Sequence[int]) -> "EncodedTexts":
        return EncodedTexts(
            input_ids=[self.input_ids[i] for i in indices],
            token_type_ids=[self.token_type_ids[i] for i in indices],
            lengths=self.lengths[np.asarray(indices, dtype=np.int64)],
            truncated=self.truncated[np.asarray(indices, dtype=np.int64)],
        )

    def concat(self, other: "EncodedTexts") -> "EncodedTexts":
        """These examples followed by `other`'s."""
        return EncodedTexts(
            input_ids=self.input_ids + other.input_ids,
            token_type_ids=self.token_type_ids + other.token_type_ids,
            lengths=np.concatenate([self.lengths, other.lengths]),
            truncated=np.concatenate([self.truncated, other.truncated]),
        )


class TextEncoder:
    """Wraps a `tokenizers.Tokenizer` with truncation to `max_length` and no built-in padding."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pad_id = _pad_id(tokenizer)  # before its padding settings, which may name it, are turned off
        self.prompt_format = None
        """How a decoder's prompts become tokens (`tfsft.tasks.causal_lm.PromptFormat`); set from a checkpoint's tokenizer."""
        self.word_tokenizer = _word_tokenizer(tokenizer)
        for backend in {id(tokenizer): tokenizer, id(self.word_tokenizer): self.word_tokenizer}.values():
            backend.no_padding()
            backend.enable_truncation(self.max_length, strategy="longest_first")

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int) -> "TextEncoder":
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"Tokenizer file not found: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise ArtifactError(f"Corrupt tokenizer file {path}: {str(error).splitlines()[0]}") from None
        return cls(tokenizer, max_length)

    @functools.cached_property
    def untruncated(self):
        """A copy of the tokenizer that neither truncates nor pads, for callers that cut windows
        themselves (question answering). Built once per encoder: copying a tokenizer costs more
        than encoding a question with it."""
        from tokenizers import Tokenizer

        copy = Tokenizer.from_str(self.tokenizer.to_str())
        copy.no_truncation()
        copy.no_padding()
        return copy

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> EncodedTexts:
        """Tokenize a batch in parallel (the Rust tokenizer uses all cores)."""
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"texts and pairs differ in length: {len(texts)} != {len(pairs)}")
        inputs = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(inputs, add_special_tokens=True)
        input_ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        type_ids = [np.asarray(e.type_ids, dtype=np.int32) for e in encodings]
        truncated = np.asarray([bool(e.overflowing) for e in encodings], dtype=bool)
        lengths = np.asarray([len(ids) for ids in input_ids], dtype=np.int32)
        return EncodedTexts(input_ids, type_ids, lengths, truncated)

    def encode_words(self, words: Sequence[Sequence[str]]) -> tuple[EncodedTexts, list[np.ndarray]]:
        """Tokenize pre-split words (token classification); also returns, per example, the word
        index of every token (-1 for special tokens), so labels and predictions map to words.

        Each word is encoded as it would be after a space in running text (see `_word_tokenizer`).
        """
        encodings = self.word_tokenizer.encode_batch(
            [list(w) for w in words], is_pretokenized=True, add_special_tokens=True
        )
        input_ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        type_ids = [np.asarray(e.type_ids, dtype=np.int32) for e in encodings]
        truncated = np.asarray([bool(e.overflowing) for e in encodings], dtype=bool)
        lengths = np.asarray([len(ids) for ids in input_ids], dtype=np.int32)
        word_ids = [np.asarray([-1 if w is None else w for w in e.word_ids], dtype=np.int64) for e in encodings]
        return EncodedTexts(input_ids, type_ids, lengths, truncated), word_ids

    def warn_truncated(self, encoded: EncodedTexts, source: str) -> None:
        count = int(encoded.truncated.sum())
        if count:
            warnings.warn(
                f"{source}: {count} of {len(encoded)} examples were longer than max_seq_length="
                f"{self.max_length} tokens and were truncated",
                stacklevel=2,
            )


def _word_tokenizer(tokenizer):
    """The tokenizer for pre-split words: `tokenizer` itself, or for a byte-level BPE (RoBERTa,
    GPT-2) a copy that prefixes every word with a space.

    A byte-level BPE encodes the space before a word into its first piece (`Ġworld`); words that
    arrive pre-split carry no space, so without the prefix every word would get the pieces of a
    text's first word, which pretraining rarely saw. transformers asks for `add_prefix_space=True`
    for word input for the same reason. WordPiece and Metaspace (SentencePiece) tokenizers already
    encode a word alone as they do in running text.
    """
    from tokenizers import Tokenizer

    spec = json.loads(tokenizer.to_str())
    if not _add_prefix_space(spec.get("pre_tokenizer")):
        return tokenizer
    return Tokenizer.from_str(json.dumps(spec))


def _add_prefix_space(pre_tokenizer) -> bool:
    """Turn on `add_prefix_space` in every ByteLevel step of a pre-tokenizer spec; True if any was off."""
    if not isinstance(pre_tokenizer, dict):
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any([_add_prefix_space(step) for step in pre_tokenizer.get("pretokenizers", [])])
    if pre_tokenizer.get("type") == "ByteLevel" and not pre_tokenizer.get("add_prefix_space"):
        pre_tokenizer["add_prefix_space"] = True
        return True
    return False


_ABBREVIATIONS = (
    "Mr|Mrs|Ms|Dr|St|Jr|Sr|Rev|Gen|Lt|Col|Sgt|Gov|Sen|Rep|Prof|Mt|Ft|Inc|Corp|Co|Ltd|Bros|vs|vol|No|"
    "Jan|Feb|Mar|Apr|Aug|Sep|Sept|Oct|Nov|Dec|Calif|Fla"
)
_CLITICS = r"(?i:s|re|ve|ll|m|d)\b"
_WORD = re.compile(
    "|".join([
        r"[A-Za-z]+(?=n['’]t\b)",  # "do" of "don't"
        r"(?i:n['’]t)\b",  # "n't"
        rf"['’]{_CLITICS}",  # 's 're 've 'll 'm 'd
        r"(?:[A-Za-z]\.){2,}",  # U.S. a.m. F.C.
        rf"\b(?:{_ABBREVIATIONS})\.",  # St. Inc. vs. Sept.
        r"\b[A-Z]\.(?=\s+[A-Z])",  # an initial: M. Smith
        r"[A-Z]{1,3}\$",  # C$ US$
        r"\A\d+\.(?=\s)",  # a numbered line: "1. Michael Johnson"
        r"[+-]?(?:\.\d+|\d+(?:[.,:/]\d+)*)\w*(?:[-&]\w+(?:[.,:/]\d+)*)*",  # 1,000 .500 6-4 1996-08-30 61st 30-5/8
        rf"\w+(?:(?:[-&]|['’](?!{_CLITICS}))\w+)*",  # words: one-day O'Neill AT&T
        r"([^\w\s])\1*",  # punctuation, a run of one character: , ( -- ...
    ])
)


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Split raw text into words as CoNLL-2003 is tokenised: (word, start, end) character offsets.

    A tagger trained on CoNLL words sees `Blackburn` and `,` as two words, so raw text is split
    the same way before tagging: punctuation comes off words (`(Berlin)` is three words), while
    abbreviations (`U.S.`), numbers (`1,000`, `6-4`), hyphenated words and names (`one-day`,
    `O'Neill`) stay whole, and clitics split as in the Penn Treebank (`is n't`, `Germany 's`).
    Every character that is not whitespace belongs to exactly one word.
    """
    return [(match.group(), match.start(), match.end()) for match in _WORD.finditer(text)]


def _pad_id(tokenizer) -> int:
    """The id the tokenizer's own padding settings name, else that of its pad token. `<pad>` comes
    first: MPNet's vocabulary has `<pad>` (id 1, its padding) and BERT's unused `[PAD]` (id 4)."""
    padding = tokenizer.padding
    if padding is not None and isinstance(padding.get("pad_id"), int):
        return int(padding["pad_id"])
    for token in ("<pad>", "[PAD]", "<PAD>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id)
    return 0


def pad_batch(
    encoded: EncodedTexts, indices: Sequence[int], pad_id: int = 0, multiple: int = PAD_MULTIPLE
) -> dict[str, np.ndarray]:
    """Pad the examples at `indices` to their longest length, rounded up to `multiple`."""
    longest = int(max(encoded.lengths[i] for i in indices))
    width = -(-longest // multiple) * multiple
    batch = len(indices)
    input_ids = np.full((batch, width), pad_id, dtype=np.int32)
    attention_mask = np.zeros((batch, width), dtype=np.int32)
    token_type_ids = np.zeros((batch, width), dtype=np.int32)
    for row, i in enumerate(indices):
        n = encoded.lengths[i]
        input_ids[row, :n] = encoded.input_ids[i]
        attention_mask[row, :n] = 1
        token_type_ids[row, :n] = encoded.token_type_ids[i]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


CALL_COST_TOKENS = 64
"""What one model call costs beyond its tokens, in padded tokens (2-core CPU, MiniLM): a batch
is split where the padding saved outweighs that cost."""

MAX_CALL_TOKENS = 1024
"""Most padded tokens in one model call (a single longer example still gets its own call). On
CPU a call's activations (MiniLM: tokens x 1536 floats in each feed-forward layer) then stay
small enough for the caches: long inputs such as question-answering windows ran faster per
token in calls of a few windows than in batches of 32 (bench/qa.py, docs/benchmarks.md), and
short texts still fill a batch."""


def split_into_calls(
    sorted_lengths: Sequence[int],
    max_batch: int,
    call_cost_tokens: int = CALL_COST_TOKENS,
    max_tokens: Optional[int] = MAX_CALL_TOKENS,
) -> list[tuple[int, int]]:
    """Split length-sorted examples into contiguous batches of at most `max_batch` examples and
    (where more than one) at most `max_tokens` padded tokens, minimising total padded tokens plus
    `call_cost_tokens` per batch, as [start, end) ranges.

    Fixed-size chunks of a mixed-length request pad every text to the chunk's longest; one call
    per text pays the per-call cost every time. Dynamic programming over the sorted lengths finds
    the cheapest split between those extremes in O(n * max_batch).
    """
    lengths = np.asarray(sorted_lengths, dtype=np.int64)
    n = len(lengths)
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive. Received: max_batch={max_batch}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive or None. Received: max_tokens={max_tokens}")
    if n and np.any(np.diff(lengths) < 0):
        raise ValueError("split_into_calls needs lengths sorted in ascending order")
    best = np.zeros(n + 1, dtype=np.int64)
    start_of = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        longest = int(lengths[end - 1])
        widest = max_batch if max_tokens is None else max(1, min(max_batch, max_tokens // max(1, longest)))
        starts = np.arange(max(0, end - widest), end)
        costs = best[starts] + call_cost_tokens + (end - starts) * longest
        pick = int(np.argmin(costs))
        best[end], start_of[end] = costs[pick], starts[pick]
    ranges = []
    end = n
    while end > 0:
        ranges.append((int(start_of[end]), end))
        end = int(start_of[end])
    return ranges[::-1]
