"""--streaming: the TFRecord token cache (written once, keyed, atomic) and streamed training."""

from collections import Counter

import pytest

from conftest import write_tsv_slice
from tfsft import RunConfig, finetune
from tfsft.config import DataConfig
from tfsft.errors import ConfigError, DataError
from tfsft.modeling import load_tokenizer, text_encoder
from tfsft.streaming import StreamingData, cache_key, open_cache


def encoder_for(checkpoint, max_length=64):
    return text_encoder(load_tokenizer(checkpoint), max_length)


def test_cache_written_once_and_reused(tiny_checkpoint, sst2_slices, tmp_path, capsys):
    config = DataConfig(train_file=str(sst2_slices["train"]), max_seq_length=64)
    encoder = encoder_for(tiny_checkpoint)
    first = open_cache(config.train_file, encoder, config, str(tmp_path))
    assert "tokenizing" in capsys.readouterr().err
    mtimes = {p: p.stat().st_mtime_ns for p in first.directory.iterdir()}
    second = open_cache(config.train_file, encoder, config, str(tmp_path))
    assert "reusing the cache" in capsys.readouterr().err
    assert second == first and len(first) == 400
    assert {p: p.stat().st_mtime_ns for p in second.directory.iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [first.directory.name]
    assert first.label_map.names == ("0", "1") and sum(first.label_counts) == 400


def test_cache_key_changes_with_file_and_max_length(tiny_checkpoint, sst2_slices, tmp_path):
    config = DataConfig(train_file=str(sst2_slices["train"]))
    encoder = encoder_for(tiny_checkpoint)
    key = cache_key(config.train_file, encoder, config)
    assert cache_key(config.train_file, encoder, config) == key
    assert cache_key(config.train_file, encoder_for(tiny_checkpoint, 32), config) != key
    changed = tmp_path / "train.tsv"
    changed.write_text(sst2_slices["train"].read_text() + "one more line\t1\n")
    assert cache_key(str(changed), encoder, config) != key
    assert cache_key(config.train_file, encoder, DataConfig(label_column="other")) != key


def test_batches_cover_every_example_once_per_epoch(tiny_checkpoint, sst2_slices, tmp_path):
    import numpy as np

    from tfsft.data import read_examples

    config = DataConfig(train_file=str(sst2_slices["train"]), max_seq_length=64)
    encoder = encoder_for(tiny_checkpoint)
    cache = open_cache(config.train_file, encoder, config, str(tmp_path))
    data = StreamingData(cache, 16, seed=1, pad_id=encoder.pad_id)
    examples = read_examples(config.train_file, config)
    encoded = encoder.encode(examples.texts)
    expected = Counter((tuple(ids), int(cache.label_map.ids[label])) for ids, label in zip(encoded.input_ids, examples.labels))
    dataset = data.to_tf_dataset()
    orders = []
    for _ in range(2):
        seen, batches, order = Counter(), 0, []
        for features, labels in dataset:
            batches += 1
            mask = features["attention_mask"].numpy()
            assert mask[:, -1].any()
            for ids, row_mask, label in zip(features["input_ids"].numpy(), mask, labels.numpy()):
                seen[(tuple(ids[row_mask == 1]), int(label))] += 1
                order.append(tuple(ids[row_mask == 1]))
        assert seen == expected
        assert batches == len(data)
        orders.append(order)
    assert orders[0] != orders[1]
    assert 0 <= data.padding_fraction() < 0.5
    assert np.all(np.asarray(cache.label_counts) > 0)


def test_malformed_row_mid_file_fails_in_one_line_and_leaves_no_cache(tiny_checkpoint, sst2_slices, tmp_path):
    lines = sst2_slices["train"].read_text().splitlines()
    lines.insert(200, "a row with\tthree\tfields")
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    cache_dir = tmp_path / "cache"
    config = DataConfig(train_file=str(bad), max_seq_length=64)
    with pytest.raises(DataError) as error:
        open_cache(str(bad), encoder_for(tiny_checkpoint), config, str(cache_dir))
    message = str(error.value)
    assert "\n" not in message and f"{bad}: row 201:" in message and "expected 2 fields" in message
    assert list(cache_dir.iterdir()) == []


def test_streaming_config_refuses_what_needs_the_whole_file(sst2_slices):
    base = dict(train_file=str(sst2_slices["train"]), streaming=True)
    with pytest.raises(ConfigError, match="validation_file"):
        RunConfig.from_flat(base)
    with pytest.raises(ConfigError, match="max_train_samples"):
        RunConfig.from_flat(dict(base, validation_file=str(sst2_slices["dev"]), max_train_samples=10))
    with pytest.raises(ConfigError, match="streaming"):
        RunConfig.from_flat(dict(base, validation_file=str(sst2_slices["dev"]), task="regression"))


def test_streamed_run_trains_and_evaluates(tiny_checkpoint, sst2_slices, tmp_path):
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]),
        validation_file=str(sst2_slices["dev"]), num_train_epochs=3, learning_rate=2e-3, warmup_ratio=0.0,
        per_device_train_batch_size=16, max_seq_length=64, output_dir=str(tmp_path / "run"), export=False,
        streaming=True, streaming_cache_dir=str(tmp_path / "cache"),
    ))
    metrics = finetune(config, verbose=0).metrics
    assert metrics["train_samples"] == 400 and metrics["epochs"] == 3
    assert metrics["train_loss_last_epoch"] < metrics["train_loss_first_epoch"]
    assert metrics["eval_samples"] == 200
    from tfsft.pipeline import evaluate_run  # the saved model, scored again on the file, scores what was reported

    assert evaluate_run(str(tmp_path / "run"), str(sst2_slices["dev"]))["eval_accuracy"] == pytest.approx(
        metrics["eval_accuracy"], abs=1e-9
    )


def test_unseen_validation_label_still_fails(tiny_checkpoint, sst2_slices, tmp_path):
    dev = write_tsv_slice(sst2_slices["dev"], tmp_path / "dev.tsv", 20)
    dev.write_text(dev.read_text() + "a new kind of sentence\t7\n")
    config = RunConfig.from_flat(dict(
        model_name_or_path=str(tiny_checkpoint), train_file=str(sst2_slices["train"]), validation_file=str(dev),
        max_seq_length=64, output_dir=str(tmp_path / "run"), export=False, streaming=True,
        streaming_cache_dir=str(tmp_path / "cache"),
    ))
    with pytest.raises(DataError, match=r"row 22: label '7' never appears in the training data"):
        finetune(config, verbose=0)
    assert not (tmp_path / "run").exists()
