"""Text augmentation for distillation: new texts made from the training texts, for a teacher to
label (TinyBERT's data augmentation, Jiao et al. 2020, without its masked-LM step).

A student learns its teacher's function only where it sees the teacher's outputs. On a training
set of short phrases, scored on whole sentences (SST-2), the student matches the teacher on
phrases and not on sentences; variants of the longer training texts let it see the teacher's
outputs around them. Each new text is one of

- a training text with some words replaced by one of their nearest neighbours among the
  checkpoint's word embeddings (cosine similarity; a neighbour may flip the meaning: the
  teacher labels the result, so that is as useful as a synonym),
- the first part of one training text joined to the last part of another by a conjunction,
  some of whose words are then replaced,
- a training text with words replaced and others dropped.

TensorFlow-free: the word embeddings come in as a numpy array. Texts are split on whitespace; a
word is replaced when, lowercased and without the punctuation around it, it is a vocabulary word
of three letters or more, and its neighbour takes its capitals and punctuation ("Great!" may
become "Excellent!"), so raw text (tweets, reviews) is augmented as well as tokenised text
(SST-2's).
"""

from __future__ import annotations

import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

NEIGHBOURS = 8
"""Candidates per word; one is drawn uniformly."""
MIN_SOURCE_WORDS = 8
"""Training texts shorter than this are not augmented (unless no text is this long): short
phrases give variants that teach little about sentences."""
JOINERS = (",", "but", ", but", "and", ", and", ", yet", ";")
"""What joins the two parts of a spliced text."""
_WORD = re.compile(r"[a-z]{3,}")
_BLOCK = 2048
_AROUND = re.compile(rf"^([{re.escape(string.punctuation)}]*)(.*?)([{re.escape(string.punctuation)}]*)$")


def _parts(word: str) -> tuple[str, str, str]:
    """(leading punctuation, the word, trailing punctuation)."""
    match = _AROUND.match(word)
    return match.group(1), match.group(2), match.group(3)


def _lookup_key(word: str) -> str:
    """The vocabulary word a text's word is looked up as: lowercased, without punctuation around it."""
    return _parts(word)[1].lower()


def _like(word: str, neighbour: str) -> str:
    """`neighbour` with `word`'s punctuation around it and its capitals (all caps, or the first)."""
    before, core, after = _parts(word)
    if len(core) > 1 and core.isupper():
        neighbour = neighbour.upper()
    elif core[:1].isupper():
        neighbour = neighbour[:1].upper() + neighbour[1:]
    return before + neighbour + after


def neighbour_table(
    vocab: Mapping[str, int], embeddings: np.ndarray, words: Iterable[str], neighbours: int = NEIGHBOURS
) -> dict[str, list[str]]:
    """For each of `words` that is a whole-word vocabulary entry (lowercase letters, at least
    three) once lowercased and stripped of the punctuation around it, keyed so, its `neighbours`
    nearest other such entries by the cosine of their embedding rows.

    `vocab` maps each token to its row of `embeddings` (a tokenizer's `get_vocab()`). WordPiece
    vocabularies (BERT, MPNet) qualify as they are: their word pieces start with `##` and never
    match."""
    outside = [token for token, row in vocab.items() if not 0 <= row < len(embeddings)]
    if outside:
        raise ValueError(
            f"{len(outside)} vocabulary entries (e.g. {outside[0]!r}) have no row among {len(embeddings)} embedding rows"
        )
    words_by_row = sorted((row, token) for token, row in vocab.items() if _WORD.fullmatch(token))
    if len(words_by_row) <= neighbours:
        return {}
    tokens = [token for _, token in words_by_row]
    candidates = np.asarray(embeddings, dtype=np.float32)[[row for row, _ in words_by_row]]
    candidates = candidates / np.maximum(np.linalg.norm(candidates, axis=1, keepdims=True), 1e-12)
    index = {token: j for j, token in enumerate(tokens)}
    used = sorted({key for key in map(_lookup_key, words) if key in index})
    queries = candidates[[index[word] for word in used]]
    table: dict[str, list[str]] = {}
    for begin in range(0, len(used), _BLOCK):
        similarity = queries[begin:begin + _BLOCK] @ candidates.T
        nearest = np.argpartition(-similarity, neighbours, axis=1)[:, :neighbours + 1]
        for word, row in zip(used[begin:begin + _BLOCK], nearest):
            table[word] = [tokens[j] for j in row if tokens[j] != word][:neighbours]
    return table


def augment_texts(
    texts: Sequence[str], count: int, table: dict[str, list[str]], seed: int = 0, min_words: int = MIN_SOURCE_WORDS
) -> list[str]:
    """`count` distinct new texts made from `texts` (see the module docstring), in the seeded
    random order they were made: the same seed gives the same texts in every process, and a
    larger `count` gives the smaller one's texts first, then more. A few may equal a training
    text (no word drawn for replacement): the teacher labels it like the rest. Raises ValueError
    when the texts cannot give that many."""
    rng = np.random.default_rng(seed)
    split = [text.strip().split() for text in texts]
    sources = [words for words in split if len(words) >= min_words] or [words for words in split if words]
    if not sources:
        raise ValueError("no text to augment: every training text is empty")

    def swap(word: str, probability: float) -> str:
        options = table.get(_lookup_key(word))
        if options and rng.random() < probability:
            return _like(word, str(rng.choice(options)))
        return word

    def replace(words: list[str], probability: float = 0.3) -> list[str]:
        return [swap(word, probability) for word in words]

    def drop(words: list[str], probability: float = 0.1) -> list[str]:
        kept = [w for w in words if rng.random() >= probability]
        return kept or words

    def splice(first: list[str], second: list[str]) -> list[str]:
        cut_first = rng.integers(len(first) // 3, 2 * len(first) // 3 + 1)
        cut_second = rng.integers(len(second) // 3, 2 * len(second) // 3 + 1)
        return first[:cut_first] + str(rng.choice(JOINERS)).split() + second[cut_second:]

    made: dict[str, None] = {}
    attempts, limit = 0, 20 * count + 1000
    while len(made) < count:
        attempts += 1
        if attempts > limit:
            raise ValueError(
                f"only {len(made)} distinct new texts after {limit} attempts (asked for {count}): the training "
                f"texts are too few or too short; ask for fewer"
            )
        words = sources[rng.integers(len(sources))]
        draw = rng.random()
        if draw < 0.5:
            words = replace(words)
        elif draw < 0.75:
            words = splice(words, sources[rng.integers(len(sources))])
            if rng.random() < 0.5:
                words = replace(words, 0.15)
        else:
            words = drop(replace(words, 0.2))
        made.setdefault(" ".join(words))
    return list(made)
