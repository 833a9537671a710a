"""`--streaming`: tokenize a training file once into a sharded TFRecord cache, then stream it.

The file is read in chunks of CHUNK_ROWS rows (never whole), each chunk validated like an
in-memory file and tokenized with the Rust tokenizer's parallel `encode_batch`, and written
as raw int32 records. The cache lives in `<--streaming_cache_dir>/<key>/`, the key hashing the file's
bytes, the tokenizer, max length and the column settings, so a changed input gets a new cache
and an unchanged one is never tokenized twice. It is written into a temp dir and renamed into
place only when complete: a killed or failed write never leaves a cache that looks valid.
Training reads the shards interleaved, shuffled in a bounded buffer and length-bucketed, so
memory stays flat however large the corpus is.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from tfsft.artifacts import file_digest
from tfsft.config import DataConfig
from tfsft.data import DelimitedRecords, LabelMap, file_format, parse_json_record, records_to_examples, resolve_columns
from tfsft.errors import DataError
from tfsft.tokenize import TextEncoder

CACHE_VERSION = 1
"""Bumped when the record layout changes, so old caches are not misread."""
CHUNK_ROWS = 10_000
"""Rows read, validated and tokenized at a time: big enough for parallel tokenization."""
SHARD_EXAMPLES = 100_000
"""Examples per TFRecord shard: several shards let reads interleave."""
SHUFFLE_BUFFER = 10_000
"""Examples held for shuffling: bounds memory independently of the corpus size."""
BUCKET_STEP = 8
"""Width in tokens of the length buckets batches are drawn from."""
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """~/.cache/tfsft/streaming (or $XDG_CACHE_HOME/tfsft/streaming): outside the data dir, which may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tfsft" / "streaming"


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


def cache_key(path: str, encoder: TextEncoder, config: DataConfig) -> str:
    """Hash of everything that shapes the records: file bytes, tokenizer, max length, columns."""
    settings = {
        "version": CACHE_VERSION,
        "file": file_digest(path),
        "format": file_format(path),
        "tokenizer": hashlib.sha256(encoder.tokenizer.to_str().encode("utf-8")).hexdigest(),
        "max_seq_length": encoder.max_length,
        "columns": [config.text_column, config.text_pair_column, config.label_column, config.no_header],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def iter_records(path: str, no_header: bool) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """(column names, lazy (row number, record) pairs) of a CSV, TSV or JSONL file.

    Errors match `data.read_records`, but the file is read line by line, never whole.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a CSV, TSV or JSONL file")
    fmt = file_format(path)
    handle = open(p, encoding="utf-8-sig", newline="")
    rows = _jsonl_rows(path, handle) if fmt == "jsonl" else _delimited_rows(path, handle, fmt, no_header)
    try:
        first = next(rows)
    except StopIteration:
        handle.close()
        raise DataError(f"{path}: file is empty") from None
    if fmt == "jsonl":
        columns = list(first[1])
        return columns, _chain(first, rows)
    columns = first[1]["__columns__"]
    return columns, rows


def _chain(first: tuple[int, dict[str, Any]], rest: Iterator) -> Iterator[tuple[int, dict[str, Any]]]:
    yield first
    yield from rest


def _jsonl_rows(path: str, handle) -> Iterator[tuple[int, dict[str, Any]]]:
    number = 0
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield number, parse_json_record(path, number, line)
        except UnicodeDecodeError:
            raise DataError(f"{path}: row {number + 1}: not valid UTF-8; re-save the file as UTF-8") from None


def _delimited_rows(path: str, handle, fmt: str, no_header: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yields a header pseudo-record {"__columns__": names} first, then data rows."""
    records = DelimitedRecords(path, handle, fmt, no_header)
    with handle:
        rows = iter(records)
        first = next(rows, None)
        if records.columns is not None:
            yield 0, {"__columns__": records.columns}
        if first is not None:
            yield first
            yield from rows


@dataclass(frozen=True)
class StreamCache:
    """A complete cache: shard paths, label map, example count and token-length histogram."""

    directory: Path
    shards: tuple[Path, ...]
    label_map: LabelMap
    label_remap: tuple[int, ...]
    num_examples: int
    length_counts: tuple[int, ...]
    label_counts: tuple[int, ...]
    num_truncated: int

    def __len__(self) -> int:
        return self.num_examples

    @classmethod
    def load(cls, directory: Path) -> "StreamCache":
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        return cls(
            directory=directory,
            shards=tuple(directory / name for name in meta["shards"]),
            label_map=LabelMap(tuple(meta["labels"])),
            label_remap=tuple(meta["label_remap"]),
            num_examples=int(meta["num_examples"]),
            length_counts=tuple(meta["length_counts"]),
            label_counts=tuple(meta["label_counts"]),
            num_truncated=int(meta["num_truncated"]),
        )

    def label_ids(self) -> np.ndarray:
        """Every example's label id in some order (for balanced class weights): only counts are kept."""
        return np.repeat(np.arange(len(self.label_counts), dtype=np.int32), self.label_counts)


def open_cache(path: str, encoder: TextEncoder, config: DataConfig, cache_dir: Optional[str] = None) -> StreamCache:
    """The cache of `path` for this tokenizer and these settings, written first if missing."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(path, encoder, config)
    final = root / key
    if (final / META_FILE).is_file():
        _log(f"streaming: reusing the cache {final}")
        return StreamCache.load(final)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root))
    try:
        _log(f"streaming: tokenizing {path} into {final}")
        _write_cache(path, encoder, config, work)
        try:
            os.rename(work, final)
        except OSError:
            if not (final / META_FILE).is_file():
                raise
            _log(f"streaming: another process wrote {final} first; using it")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cache = StreamCache.load(final)
    if cache.num_truncated:
        _log(
            f"warning: {path}: {cache.num_truncated} of {cache.num_examples} examples were longer than "
            f"max_seq_length={encoder.max_length} tokens and were truncated"
        )
    return cache


def _write_cache(path: str, encoder: TextEncoder, config: DataConfig, work: Path) -> None:
    """One pass: read chunks, validate, tokenize, write shards; labels get ids in order of first
    appearance, remapped to the sorted label map when the pass is done (stored in meta.json)."""
    from tfsft.runtime import import_tensorflow

    tf = import_tensorflow()
    columns, records = iter_records(path, config.no_header)
    text, pair, label = resolve_columns(config, columns, path)
    first_seen: dict[str, int] = {}
    label_counts: list[int] = []
    length_counts = np.zeros(encoder.max_length + 1, dtype=np.int64)
    shards: list[str] = []
    writer = None
    in_shard = total = truncated = 0
    chunk: list[tuple[int, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal writer, in_shard, total, truncated
        examples = records_to_examples(chunk, text, pair, label, path)
        encoded = encoder.encode(examples.texts, examples.pairs)
        truncated += int(encoded.truncated.sum())
        np.add.at(length_counts, encoded.lengths, 1)
        for raw, ids, types in zip(examples.labels, encoded.input_ids, encoded.token_type_ids):
            label_id = first_seen.setdefault(raw, len(first_seen))
            if label_id == len(label_counts):
                label_counts.append(0)
            label_counts[label_id] += 1
            if writer is None or in_shard >= SHARD_EXAMPLES:
                if writer is not None:
                    writer.close()
                shards.append(f"shard-{len(shards):05d}.tfrecord")
                writer = tf.io.TFRecordWriter(str(work / shards[-1]))
                in_shard = 0
            writer.write(np.concatenate([[label_id], ids, types]).astype(np.int32).tobytes())
            in_shard += 1
            total += 1
        chunk.clear()

    try:
        for record in records:
            chunk.append(record)
            if len(chunk) >= CHUNK_ROWS:
                flush()
        if chunk:
            flush()
    finally:
        if writer is not None:
            writer.close()
    provisional = [name for name, _ in sorted(first_seen.items(), key=lambda item: item[1])]
    label_map = LabelMap.from_labels(provisional, path)
    remap = [label_map.ids[name] for name in provisional]
    counts = [0] * len(label_map.names)
    for name, count in zip(provisional, label_counts):
        counts[label_map.ids[name]] = count
    meta = {
        "version": CACHE_VERSION,
        "source": str(path),
        "shards": shards,
        "labels": list(label_map.names),
        "label_remap": remap,
        "num_examples": total,
        "length_counts": length_counts.tolist(),
        "label_counts": counts,
        "num_truncated": truncated,
    }
    (work / META_FILE).write_text(json.dumps(meta), encoding="utf-8")


def bucket_boundaries(max_length: int) -> list[int]:
    """Upper (exclusive) token lengths of the buckets: every BUCKET_STEP tokens."""
    return list(range(BUCKET_STEP + 1, max_length + 1, BUCKET_STEP))


class StreamingData:
    """Length-bucketed, shuffled batches streamed from a StreamCache; `LengthBatchedData`'s
    interface for training (`len`, `epoch`, `to_tf_dataset`, `padding_fraction`)."""

    def __init__(
        self,
        cache: StreamCache,
        batch_size: int,
        *,
        seed: int = 0,
        pad_id: int = 0,
        feature_names: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
        class_weights: Optional[np.ndarray] = None,
    ):
        if cache.num_examples == 0:
            raise DataError(f"{cache.directory}: no examples to batch")
        self.cache = cache
        self.batch_size = batch_size
        self.seed = seed
        self.pad_id = pad_id
        self.feature_names = tuple(feature_names)
        self.class_weights = class_weights
        self.epoch = 0
        self.boundaries = bucket_boundaries(len(cache.length_counts) - 1)

    def _bucket_sizes(self) -> np.ndarray:
        lengths = np.arange(len(self.cache.length_counts))
        buckets = np.searchsorted(self.boundaries, lengths, side="right")
        return np.bincount(buckets, weights=self.cache.length_counts, minlength=len(self.boundaries) + 1)

    def __len__(self) -> int:
        """Batches per epoch: each bucket yields full batches and one final partial one."""
        return int(sum(math.ceil(count / self.batch_size) for count in self._bucket_sizes()))

    def padding_fraction(self) -> float:
        """Upper bound of the share of padding: as if every batch were padded to its bucket's top."""
        counts = np.asarray(self.cache.length_counts, dtype=np.float64)
        lengths = np.arange(len(counts))
        bucket_tops = np.asarray([*self.boundaries, len(counts)]) - 1
        tops = bucket_tops[np.searchsorted(self.boundaries, lengths, side="right")]
        return float(1.0 - (counts * lengths).sum() / max((counts * tops).sum(), 1.0))

    def to_tf_dataset(self):
        """One epoch of padded batches; reshuffled (shards and examples) on every iteration."""
        from tfsft.runtime import import_tensorflow

        tf = import_tensorflow()
        shards = [str(p) for p in self.cache.shards]
        remap = tf.constant(self.cache.label_remap, dtype=tf.int32)
        weights = None if self.class_weights is None else tf.constant(self.class_weights, dtype=tf.float32)
        names = self.feature_names

        def parse(record):
            values = tf.io.decode_raw(record, tf.int32)
            length = (tf.shape(values)[0] - 1) // 2
            ids = values[1 : 1 + length]
            features = {
                "input_ids": ids,
                "attention_mask": tf.ones_like(ids),
                "token_type_ids": values[1 + length :],
            }
            label = tf.gather(remap, values[0])
            return {name: features[name] for name in names}, label

        files = tf.data.Dataset.from_tensor_slices(shards).shuffle(len(shards), seed=self.seed, reshuffle_each_iteration=True)
        dataset = files.interleave(
            tf.data.TFRecordDataset, cycle_length=min(len(shards), 4), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=self.seed, reshuffle_each_iteration=True)
        dataset = dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        dataset = dataset.bucket_by_sequence_length(
            lambda features, _: tf.shape(features["input_ids"])[0],
            bucket_boundaries=self.boundaries,
            bucket_batch_sizes=[self.batch_size] * (len(self.boundaries) + 1),
            padding_values=({name: (self.pad_id if name == "input_ids" else 0) for name in names}, 0),
        )
        if weights is not None:
            dataset = dataset.map(lambda features, label: (features, label, tf.gather(weights, label)))
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(self)))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        options.deterministic = True
        return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)
