"""Knowledge distillation: train a student on the hard labels and a teacher's softened outputs
(Hinton et al. 2015), the teacher being another tfsft run or its ONNX bundle.

The teacher's logits for the training texts are computed once, before training (through its
ONNX bundle when it has one: onnxruntime, the teacher's own tokenizer and length), saved in the
run directory as `teacher_logits.npy` (a resumed run reads them back; with --teacher_cache_dir
also in a cache shared by runs, keyed by the teacher's files and the texts, so a sweep over
alpha or the temperature computes them once, and a run whose texts other runs labelled in part,
such as more augmented texts, computes only the new ones), and packed beside the hard
labels into the training targets: `[label, teacher logits...]` (classification),
`[score, teacher score]` (regression), `[label set..., teacher logits...]` (multilabel). The loss
(`distillation_loss`) unpacks them: `alpha * hard loss + (1 - alpha) * soft loss`, the soft loss
being the KL divergence of the temperature-softened distributions times T^2 (classification),
the squared error to the teacher's score (regression), or the cross-entropy of the softened
per-label sigmoids times T^2 (multilabel). Validation targets stay plain, so validation loss and
metrics are those of any run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np

from tfsft import artifacts
from tfsft.checkpoint import saved_label_map
from tfsft.data import Examples, LabelMap
from tfsft.errors import ConfigError
from tfsft.tasks import get_task

TEACHER_LOGITS_FILE = "teacher_logits.npy"
TEACHER_UNLABELED_LOGITS_FILE = "teacher_logits_unlabeled.npy"
DIGESTS_SUFFIX = ".digests"
"""Beside each shared cache entry KEY.npy, KEY.digests: its texts' `text_digests`, in row order."""
PROGRESS_EVERY = 8192
"""Texts per teacher call between progress lines: a large teacher over a full training set runs
for many minutes, and each call still sorts its texts by length."""


def check_teacher(teacher: str) -> None:
    """Refuse a --teacher_model that is neither a bundle nor a finished run (before anything trains)."""
    if artifacts.find_bundle(teacher) is None and not (Path(teacher) / artifacts.MODEL_DIR / "config.json").is_file():
        raise ConfigError(
            f"--teacher_model {teacher}: neither an ONNX bundle (bundle.json) nor a finished tfsft run (model/); pass "
            f"RUN_DIR or RUN_DIR/onnx of a run fine-tuned for this task. Received: teacher_model={teacher!r}"
        )


def teacher_task_and_labels(teacher: str) -> tuple[str, tuple[str, ...]]:
    """The task and output labels of a teacher, read without TensorFlow."""
    bundle = artifacts.find_bundle(teacher)
    if bundle is not None:
        meta = artifacts.read_json(bundle / artifacts.BUNDLE_FILE, "bundle metadata")
        return str(meta.get("task", "classification")), tuple(str(label) for label in meta.get("labels", ()))
    config = artifacts.read_config(Path(teacher))
    return config.model.task, saved_label_map(Path(teacher) / artifacts.MODEL_DIR).names


def teacher_columns(teacher: str, task: str, label_map: LabelMap) -> np.ndarray:
    """For each student output, the index of the teacher output that matches it (by label name).

    Raises:
        ConfigError: the teacher was trained for another task or on other labels.
    """
    teacher_task, labels = teacher_task_and_labels(teacher)
    if teacher_task != task:
        raise ConfigError(
            f"--teacher_model {teacher} was trained for --task {teacher_task}, this run is --task {task}. "
            f"Received: teacher_model={teacher!r}"
        )
    return get_task(task).teacher_columns(teacher, labels, label_map)


def _inputs(examples: Examples) -> list[Any]:
    if examples.pairs is None:
        return list(examples.texts)
    return list(zip(examples.texts, examples.pairs))


def compute_teacher_logits(
    teacher: str, examples: Examples, task: str, label_map: LabelMap, progress_every: int = PROGRESS_EVERY
) -> np.ndarray:
    """The teacher's outputs for `examples`, columns in the student's label order: through its
    ONNX bundle when it has one (no TensorFlow; a progress line every `progress_every` texts),
    else its Keras model."""
    columns = teacher_columns(teacher, task, label_map)
    bundle = artifacts.find_bundle(teacher)
    if bundle is not None:
        from tfsft.inference import Predictor

        predictor, inputs = Predictor(bundle, int8=False, batch_size=64), _inputs(examples)
        chunks, start = [], time.perf_counter()
        for begin in range(0, len(inputs), progress_every):
            chunks.append(predictor.logits(inputs[begin:begin + progress_every]))
            if len(inputs) > progress_every:
                done = min(begin + progress_every, len(inputs))
                print(f"[tfsft] teacher outputs: {done:,} of {len(inputs):,} texts "
                      f"({done / (time.perf_counter() - start):.1f} texts/s)", file=sys.stderr, flush=True)
        logits = np.concatenate(chunks)
    else:
        logits = _keras_teacher_logits(Path(teacher), examples, task)
    return np.ascontiguousarray(logits[:, columns], dtype=np.float32)


def _keras_teacher_logits(run: Path, examples: Examples, task: str) -> np.ndarray:
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.data import LengthBatchedData
    from tfsft.evaluation import predict_logits
    from tfsft.lora import load_run_model
    from tfsft.modeling import feature_names

    config = artifacts.read_config(run)
    model_dir = run / artifacts.MODEL_DIR
    model = load_run_model(model_dir, task)
    encoder = text_encoder(load_tokenizer(model_dir), config.data.max_seq_length)
    data = LengthBatchedData(
        encoder.encode(examples.texts, examples.pairs), None, 64, shuffle=False, pad_id=encoder.pad_id,
        feature_names=feature_names(model),
    )
    return predict_logits(model, data)


class SharedCache(NamedTuple):
    """--teacher_cache_dir: where teacher outputs shared by runs live, and the digest of the
    teacher's files that their keys start from (hashed once per run, not per set of texts)."""

    directory: Path
    teacher_digest: str


def shared_cache(directory: str | Path, teacher: str) -> SharedCache:
    """The shared cache in `directory` for `teacher`, whose files (the bundle it is read through,
    else its run's model/ and config.json) are hashed now: a re-trained or re-exported teacher
    gets other keys."""
    bundle = artifacts.find_bundle(teacher)
    run = Path(teacher)
    files = sorted(bundle.rglob("*")) if bundle is not None else [*sorted((run / artifacts.MODEL_DIR).rglob("*")),
                                                                   run / artifacts.CONFIG_FILE]
    digests = [[path.name, artifacts.file_digest(path)] for path in files if path.is_file()]
    return SharedCache(Path(directory).expanduser(), hashlib.sha256(json.dumps(digests).encode()).hexdigest())


def teacher_logits(
    teacher: str, examples: Examples, task: str, label_map: LabelMap, cache: Path, shared: Optional[SharedCache] = None
) -> tuple[np.ndarray, str]:
    """The teacher's outputs for `examples`, read from `cache` when a run being resumed computed
    them already (same teacher, same number of examples), else from `shared` when any run
    computed them for the same teacher files, texts and labels (text by text: the texts no run
    labelled yet are computed), else computed; written to `cache` (and `shared`, with the texts'
    digests, which an older entry without them gains on its first hit). Returns
    (logits, where from: "run", "shared cache", "shared cache in part" or "computed")."""
    meta_path = cache.with_suffix(".json")
    expected = {"teacher": str(Path(teacher).resolve()), "examples": len(examples), "labels": list(label_map.names)}
    if cache.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == expected:
                return np.load(cache), "run"
        except (OSError, ValueError):
            pass
    if shared is None:
        logits, source = compute_teacher_logits(teacher, examples, task, label_map), "computed"
    else:
        entry = shared.directory / f"{teacher_outputs_key(shared.teacher_digest, examples, task, label_map)}.npy"
        digests_file = entry.with_suffix(DIGESTS_SUFFIX)
        logits, source = _read_shared(entry, len(examples)), "shared cache"
        if logits is None:
            digests = text_digests(shared.teacher_digest, examples, task, label_map)
            logits, source = _assemble_from_shared(shared.directory, digests, teacher, examples, task, label_map)
            entry.parent.mkdir(parents=True, exist_ok=True)
            _save_npy(digests_file, digests)
            _save_npy(entry, logits)
        elif not digests_file.is_file():  # written before text-by-text lookup existed
            _save_npy(digests_file, text_digests(shared.teacher_digest, examples, task, label_map))
    _save_npy(cache, logits)
    artifacts.write_json(meta_path, expected)
    return logits, source


def teacher_outputs_key(teacher_digest: str, examples: Examples, task: str, label_map: LabelMap) -> str:
    """What the teacher's outputs depend on, hashed: the teacher's files (`shared_cache`), the
    task, the student's labels (the column order) and every input text."""
    digest = hashlib.sha256(json.dumps(["tfsft teacher outputs 1", teacher_digest, task, list(label_map.names)]).encode())
    for item in _inputs(examples):
        digest.update(json.dumps(item).encode() + b"\n")
    return digest.hexdigest()[:32]


def text_digests(teacher_digest: str, examples: Examples, task: str, label_map: LabelMap) -> np.ndarray:
    """One digest per input text (16 bytes a row) of what its teacher output depends on: the
    teacher's files, the task, the student's labels and the text, so runs whose texts overlap
    share the outputs of the texts they have in common."""
    prefix = json.dumps(["tfsft teacher output 1", teacher_digest, task, list(label_map.names)]).encode() + b"\n"
    rows = b"".join(hashlib.sha256(prefix + json.dumps(item).encode()).digest()[:16] for item in _inputs(examples))
    return np.frombuffer(rows, dtype=np.uint8).reshape(len(examples), 16)


def _assemble_from_shared(
    directory: Path, digests: np.ndarray, teacher: str, examples: Examples, task: str, label_map: LabelMap
) -> tuple[np.ndarray, str]:
    """The outputs of texts any shared entry holds (by text digest), the rest computed now."""
    wanted: dict[bytes, list[int]] = {}
    for index, row in enumerate(digests):
        wanted.setdefault(bytes(row), []).append(index)  # a text given twice takes its output from one row
    logits = np.full((len(examples), len(label_map.names)), np.nan, dtype=np.float32)
    found = np.zeros(len(examples), dtype=bool)
    for digest_file in sorted(directory.glob(f"*{DIGESTS_SUFFIX}")) if directory.is_dir() else ():
        if found.all():
            break
        try:
            stored = np.load(digest_file)
        except (OSError, ValueError):
            continue
        if stored.dtype != digests.dtype or stored.ndim != 2 or stored.shape[1] != digests.shape[1]:
            continue
        rows = [(index, row) for row, key in enumerate(map(bytes, stored))
                for index in wanted.get(key, ()) if not found[index]]
        entry = _read_shared(digest_file.with_suffix(".npy"), len(stored)) if rows else None
        if entry is None or entry.shape[1] != logits.shape[1]:
            continue
        indices, entry_rows = (np.array(column) for column in zip(*rows))
        logits[indices], found[indices] = entry[entry_rows], True
    missing = np.flatnonzero(~found)
    if len(missing) == 0:
        return logits, "shared cache"
    if found.any():
        print(f"[tfsft] teacher outputs: {found.sum():,} of {len(examples):,} texts read from the shared cache, "
              f"computing the other {len(missing):,}", file=sys.stderr, flush=True)
    logits[missing] = compute_teacher_logits(teacher, examples.subset(missing.tolist()), task, label_map)
    return logits, "shared cache in part" if found.any() else "computed"


def _read_shared(path: Path, rows: int) -> Optional[np.ndarray]:
    """A shared cache entry, or None when there is none or it is unreadable or of another shape
    (a corrupt entry is computed again and overwritten, never trusted)."""
    if not path.is_file():
        return None
    try:
        logits = np.load(path)
    except (OSError, ValueError) as error:
        print(f"[tfsft] teacher outputs: ignoring the unreadable cache entry {path} ({error})", file=sys.stderr)
        return None
    if logits.ndim != 2 or logits.shape[0] != rows or not np.isfinite(logits).all():
        print(f"[tfsft] teacher outputs: ignoring the cache entry {path} of shape {logits.shape}", file=sys.stderr)
        return None
    return logits


def _save_npy(path: Path, array: np.ndarray) -> None:
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def pack_targets(task: str, labels: np.ndarray, teacher: np.ndarray) -> np.ndarray:
    """Training targets carrying the teacher's outputs beside the hard labels (float32)."""
    hard = np.asarray(labels, dtype=np.float32).reshape(len(labels), -1)
    return np.concatenate([hard, teacher.astype(np.float32)], axis=1)


def teacher_labels(task: str, teacher: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Hard labels the teacher gives unlabelled texts: its argmax, its score, or its label set."""
    return get_task(task).teacher_labels(teacher, threshold)


def hard_width(task: str, outputs: int) -> int:
    """Columns of the hard labels in packed targets."""
    return get_task(task).distill_hard_width(outputs)


def distillation_objective(task: str, outputs: int, alpha: float, temperature: float) -> tuple[Any, list]:
    """(loss, Keras metrics) of a distilled run: packed training targets are unpacked; plain ones
    (validation) get the task's ordinary loss and metrics."""
    from tfsft.modeling import tf

    spec = get_task(task)
    width = hard_width(task, outputs)
    packed_width = width + outputs

    def unpack(y_true):
        """(hard targets, teacher outputs or None)."""
        if y_true.shape.rank == 2 and y_true.shape[-1] == packed_width and packed_width != width:
            return y_true[:, :width], y_true[:, width:]
        return y_true, None

    def distillation_loss(y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        hard, teacher = unpack(tf.cast(y_true, tf.float32))
        hard_loss, soft_loss = spec.distill_losses(hard, teacher, y_pred, temperature)
        if soft_loss is None:
            return hard_loss
        return alpha * hard_loss + (1.0 - alpha) * soft_loss

    def metric(y_true, y_pred):
        hard, _ = unpack(tf.cast(y_true, tf.float32))
        return spec.distill_metric(hard, y_pred)

    metric.__name__ = spec.distill_metric_name
    return distillation_loss, [metric]


def mix_unlabeled(
    task: str, labels: np.ndarray, teacher: np.ndarray, unlabeled_teacher: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels and teacher outputs of labelled plus teacher-labelled examples, in that order."""
    return (
        np.concatenate([np.asarray(labels).astype(np.float32).reshape(len(labels), -1),
                        teacher_labels(task, unlabeled_teacher, threshold).astype(np.float32).reshape(len(unlabeled_teacher), -1)]),
        np.concatenate([teacher, unlabeled_teacher]),
    )
