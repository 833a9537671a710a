import numpy as np
import pytest

from tfsft.tokenize import MAX_CALL_TOKENS, TextEncoder, pad_batch, split_into_calls


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint):
    return TextEncoder.from_file(tiny_checkpoint / "tokenizer.json", max_length=16)


def test_single_texts_get_special_tokens_and_no_padding(encoder):
    encoded = encoder.encode(["hello world", "a much longer sentence than the first one"])
    assert encoded.input_ids[0][0] == 101 and encoded.input_ids[0][-1] == 102
    assert encoded.lengths.tolist() == [len(ids) for ids in encoded.input_ids]
    assert encoded.lengths[0] < encoded.lengths[1]
    assert not encoded.truncated.any()


def test_pairs_get_segment_ids(encoder):
    encoded = encoder.encode(["first part"], ["second"])
    types = encoded.token_type_ids[0]
    assert types[0] == 0 and types[-1] == 1 and set(types.tolist()) == {0, 1}


def test_long_texts_are_truncated_and_flagged(encoder):
    encoded = encoder.encode(["word " * 100])
    assert encoded.lengths[0] == 16 and encoded.truncated[0]
    with pytest.warns(UserWarning, match="truncated"):
        encoder.warn_truncated(encoded, "x.csv")


def test_the_untruncated_copy_is_built_once_and_the_encoder_still_truncates(encoder):
    copy = encoder.untruncated
    assert copy is encoder.untruncated and copy is not encoder.tokenizer
    assert copy.truncation is None and copy.padding is None
    assert len(copy.encode("word " * 100).ids) > 16
    assert encoder.encode(["word " * 100]).lengths[0] == 16


def test_pad_batch_pads_to_the_longest_or_a_multiple(encoder):
    encoded = encoder.encode(["a", "a b c d e f g h i j"])
    assert pad_batch(encoded, [0, 1], encoder.pad_id, multiple=8)["input_ids"].shape == (2, 16)
    batch = pad_batch(encoded, [0, 1], encoder.pad_id)
    assert batch["input_ids"].shape == (2, int(encoded.lengths.max()))
    assert batch["attention_mask"].sum(axis=1).tolist() == encoded.lengths.tolist()
    assert (batch["input_ids"][0, encoded.lengths[0]:] == encoder.pad_id).all()
    assert batch["input_ids"].dtype == np.int32


def test_missing_tokenizer_file_is_an_artifact_error(tmp_path):
    from tfsft.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not found"):
        TextEncoder.from_file(tmp_path / "tokenizer.json", 16)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="Corrupt"):
        TextEncoder.from_file(tmp_path / "tokenizer.json", 16)


def _split_cost(lengths, ranges, call_cost):
    return sum(call_cost + (end - start) * lengths[end - 1] for start, end in ranges)


def _brute_force_cost(lengths, max_batch, call_cost, max_tokens=None):
    """Cheapest cost over every split of the sorted lengths into contiguous batches of at most
    max_batch examples and, where more than one, at most max_tokens padded tokens."""
    best = {0: 0}
    for end in range(1, len(lengths) + 1):
        best[end] = min(
            best[start] + call_cost + (end - start) * lengths[end - 1]
            for start in range(max(0, end - max_batch), end)
            if max_tokens is None or end - start == 1 or (end - start) * lengths[end - 1] <= max_tokens
        )
    return best[len(lengths)]


@pytest.mark.parametrize("seed", range(5))
def test_split_into_calls_is_the_cheapest_contiguous_split(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(3, 80, size=int(rng.integers(1, 40))).tolist())
    for max_tokens in (None, 200, 50):
        ranges = split_into_calls(lengths, max_batch=8, call_cost_tokens=40, max_tokens=max_tokens)
        assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(0 < end - start <= 8 for start, end in ranges)
        if max_tokens is not None:
            assert all(end - start == 1 or (end - start) * lengths[end - 1] <= max_tokens for start, end in ranges)
        assert _split_cost(lengths, ranges, 40) == _brute_force_cost(lengths, 8, 40, max_tokens)


def test_split_into_calls_splits_mixed_lengths_and_keeps_short_texts_together():
    assert split_into_calls([8] * 16, max_batch=32) == [(0, 16)]
    short_and_long = [6, 7, 7, 8, 60, 62, 64]
    assert split_into_calls(short_and_long, max_batch=32, call_cost_tokens=64) == [(0, 4), (4, 7)]
    assert split_into_calls([10, 10, 10], max_batch=1) == [(0, 1), (1, 2), (2, 3)]
    assert split_into_calls([], max_batch=4) == []
    long_windows = [300] * 20
    assert split_into_calls(long_windows, max_batch=32, max_tokens=None) == [(0, 20)]
    assert split_into_calls(long_windows, max_batch=32, max_tokens=1200) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 20)]
    assert split_into_calls([5000, 6000], max_batch=32, max_tokens=1200) == [(0, 1), (1, 2)]
    windows = [384] * 10  # question-answering windows: the default budget keeps each call small
    assert all((end - start) * 384 <= MAX_CALL_TOKENS for start, end in split_into_calls(windows, max_batch=32))
    with pytest.raises(ValueError, match="max_tokens"):
        split_into_calls([5], max_batch=4, max_tokens=0)
    with pytest.raises(ValueError, match="sorted"):
        split_into_calls([5, 3], max_batch=4)


def test_split_words_splits_punctuation_off_as_conll_does():
    from tfsft.tokenize import split_words

    text = "Peter Blackburn, (Berlin) said the U.S. isn't \"ready\": 1,000 one-day games; Germany's 6-4 win..."
    words = split_words(text)
    assert [w for w, _, _ in words] == [
        "Peter", "Blackburn", ",", "(", "Berlin", ")", "said", "the", "U.S.", "is", "n't", '"', "ready", '"', ":",
        "1,000", "one-day", "games", ";", "Germany", "'s", "6-4", "win", "...",
    ]
    assert all(text[start:end] == word for word, start, end in words)


@pytest.mark.parametrize("seed", range(3))
def test_split_words_covers_every_character_with_exact_offsets(seed):
    from tfsft.tokenize import split_words

    rng = np.random.default_rng(seed)
    alphabet = list("aZ09.,'’-&$()\"!?;:/ \t\n") + ["é", "中", "\u00a0", "\u200b", "😀", "n't", "U.S.", "'s"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(0, 30))))
        words = split_words(text)
        for word, start, end in words:
            assert word and text[start:end] == word and not any(c.isspace() for c in word)
        assert all(a[2] <= b[1] for a, b in zip(words, words[1:]))
        assert "".join(w for w, _, _ in words) == "".join(text.split())


def test_split_words_gives_back_conll_words():
    """Space-joined CoNLL sentences split back into their own words (abbreviations, numbers,
    hyphenated words and clitics as CoNLL tokenised them)."""
    from conftest import shared_path
    from tfsft.tokenize import split_words

    sentences = [
        [line.split()[0] for line in block.splitlines() if line.strip() and not line.startswith("-DOCSTART-")]
        for block in shared_path("conll2003", "dev.txt").read_text(encoding="utf-8").split("\n\n")[:1000]
    ]
    sentences = [words for words in sentences if words]
    same = sum([w for w, _, _ in split_words(" ".join(words))] == words for words in sentences)
    assert same / len(sentences) > 0.97
