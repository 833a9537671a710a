import numpy as np
import pytest

from tfsft.tokenize import TextEncoder, pad_batch


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
