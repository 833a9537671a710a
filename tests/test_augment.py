"""Text augmentation for distillation (tfsft.augment): the neighbour table against a hand-made
embedding, and the new texts' counts, seeding, sources and operations."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfsft.augment import augment_texts, neighbour_table


def _embeddings(vocab: list[str]) -> np.ndarray:
    """Rows placed so each word's nearest neighbours are known: good~great~fine, bad~awful~poor."""
    directions = {
        "good": [1.0, 0.0, 0.0], "great": [0.9, 0.1, 0.0], "fine": [0.8, 0.3, 0.0],
        "bad": [0.0, 1.0, 0.0], "awful": [0.1, 0.9, 0.0], "poor": [0.2, 0.8, 0.1],
        "film": [0.0, 0.0, 1.0], "movie": [0.0, 0.1, 0.9], "##ing": [1.0, 0.0, 0.0], "an": [1.0, 0.0, 0.0],
        "[CLS]": [0.9, 0.1, 0.0],
    }
    return np.array([directions[token] for token in vocab], dtype=np.float32)


TOKENS = ["[CLS]", "good", "great", "fine", "bad", "awful", "poor", "film", "movie", "##ing", "an"]
VOCAB = {token: row for row, token in enumerate(TOKENS)}


def test_neighbours_are_the_nearest_whole_words_by_cosine():
    table = neighbour_table(VOCAB, _embeddings(TOKENS) * 7.0, ["good", "bad", "film", "an", "unknown"], neighbours=2)
    assert set(table) == {"good", "bad", "film"}  # 'an' is too short to be a word entry; 'unknown' not in vocab
    assert sorted(table["good"]) == ["fine", "great"]  # not [CLS], ##ing or an, however close
    assert sorted(table["bad"]) == ["awful", "poor"]
    assert "movie" in table["film"] and "film" not in table["film"]
    reordered = dict(reversed(list(VOCAB.items())))  # rows come from the mapping, not its order
    assert neighbour_table(reordered, _embeddings(TOKENS) * 7.0, ["good", "bad", "film"], neighbours=2) == table


def test_neighbour_table_refuses_tokens_without_an_embedding_row():
    with pytest.raises(ValueError, match="8 vocabulary entries .* no row among 3 embedding rows"):
        neighbour_table(VOCAB, _embeddings(TOKENS)[:3], ["good"])


SOURCES = [
    "a good film with a great cast and a fine score",
    "a bad film with an awful cast and a poor score",
    "short and good",
    "the movie is good , the film is great and the story fine",
]


def test_new_texts_are_distinct_seeded_and_made_only_from_long_texts():
    table = neighbour_table(VOCAB, _embeddings(TOKENS), " ".join(SOURCES).split(), neighbours=2)
    first = augment_texts(SOURCES, 40, table, seed=3)
    assert len(first) == len(set(first)) == 40
    assert first == augment_texts(SOURCES, 40, table, seed=3)
    assert first != augment_texts(SOURCES, 40, table, seed=4)
    vocabulary = set(" ".join(SOURCES).split()) | {"but", "yet", ";"}
    for text in first:
        assert set(text.split()) <= vocabulary, text
        assert "short and good" not in text  # under 8 words: not a source
    swapped = [t for t in first if len(t.split()) == 11 and t.split()[2] == "film" and t.split()[1] in ("great", "fine")]
    assert swapped, "no text had 'good' replaced by one of its neighbours"
    spliced = [t for t in first if any(joiner in t.split() for joiner in ("but", "yet", ";"))]
    assert spliced, "no two texts were joined"


def test_new_texts_are_the_same_in_every_process_and_a_larger_count_extends_a_smaller_one():
    """Python salts str hashes per process: texts must not come out in set order, or a rerun of the
    same seed (and its teacher cache key) differs. Asking for more texts gives the same texts first."""
    script = (
        "import json, sys; sys.path[:0] = [sys.argv[1]]; import test_augment as t; "
        "table = t.neighbour_table(t.VOCAB, t._embeddings(t.TOKENS), ' '.join(t.SOURCES).split(), neighbours=2); "
        "print(json.dumps(t.augment_texts(t.SOURCES, 40, table, seed=3)))"
    )
    runs = [
        json.loads(subprocess.run(
            [sys.executable, "-c", script, os.path.dirname(__file__)], check=True, capture_output=True, text=True,
            env={**os.environ, "PYTHONHASHSEED": salt},
        ).stdout)
        for salt in ("1", "2", "3")
    ]
    assert runs[0] == runs[1] == runs[2]
    table = neighbour_table(VOCAB, _embeddings(TOKENS), " ".join(SOURCES).split(), neighbours=2)
    assert augment_texts(SOURCES, 40, table, seed=3) == runs[0]
    assert augment_texts(SOURCES, 60, table, seed=3)[:40] == runs[0]


def test_too_few_sources_for_the_count_is_an_error_and_short_sets_fall_back_to_all_texts():
    table = neighbour_table(VOCAB, _embeddings(TOKENS), ["good", "bad"], neighbours=2)
    texts = augment_texts(["good film", "bad film"], 3, table, seed=0)
    assert len(texts) == 3 and all(t.split()[-1] == "film" or ";" in t or "," in t for t in texts)
    with pytest.raises(ValueError, match="distinct new texts"):
        augment_texts(["good film", "bad film"], 500, table, seed=0)
    with pytest.raises(ValueError, match="every training text is empty"):
        augment_texts(["", " "], 3, table)


def test_raw_text_words_match_without_case_or_punctuation_and_keep_them():
    """Tweets and reviews are not tokenised: "Great!" is looked up as "great", and its neighbour
    comes back with the capital and the "!"."""
    texts = ["What a GREAT film, truly Great! and (good) acting from everyone here"]
    table = neighbour_table(VOCAB, _embeddings(TOKENS), texts[0].split(), neighbours=2)
    assert set(table) == {"great", "film", "good"}
    made = augment_texts(texts, 60, table, seed=1)
    swapped = {w for text in made for w in text.split()} - set(texts[0].split()) - {"but", "yet", ";", ","}
    # GREAT -> GOOD/FINE, Great! -> Good!/Fine!, (good) -> (great)/(fine), film, -> movie,/poor,
    assert swapped == {"GOOD", "FINE", "Good!", "Fine!", "(great)", "(fine)", "movie,", "poor,"}, swapped

