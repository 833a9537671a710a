"""Layout of a run directory and of an ONNX bundle, and atomic writes. No TensorFlow here.

A run directory::

    config.json          the RunConfig that produced everything below
    model/               fine-tuned model + tokenizer in transformers format (from_pretrained)
    metrics.json         eval_* (and test_*) metrics, train_runtime_s, train_examples_per_s
    eval_report.json     classification report and confusion matrix
    validation_examples.json  the validation examples evaluated (and checked for ONNX parity)
    confusion_matrix.png
    history.csv          Keras per-epoch history
    logs/                TensorBoard event files
    onnx/                the production bundle (see BUNDLE_* below)

A run is built in a sibling `.NAME.partial` directory and renamed into place once trained,
evaluated and saved, so a directory named like a run is always a finished one. Its `onnx/` comes
after, built in a hidden `.onnx.*.partial` directory inside the run and renamed into place when
every model passed parity: a run without `onnx/` (an export that failed or was killed) is still
complete, and `tfsft export RUN_DIR` adds the bundle.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from tfsft.config import RunConfig
from tfsft.errors import ArtifactError, ConfigError

CONFIG_FILE = "config.json"
MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
VALIDATION_EXAMPLES = "validation_examples.json"
REPORT_FILE = "eval_report.json"
CONFUSION_PLOT = "confusion_matrix.png"
HISTORY_FILE = "history.csv"
LOGS_DIR = "logs"
BACKUP_DIR = "backup"
BEST_WEIGHTS = "best_weights.h5"
ONNX_DIR = "onnx"

BUNDLE_FILE = "bundle.json"
BUNDLE_TOKENIZER = "tokenizer.json"
BUNDLE_MODEL = "model.onnx"
BUNDLE_MODEL_FUSED = "model.fused.onnx"
BUNDLE_MODEL_INT8 = "model.int8.onnx"
BUNDLE_REPORT = "export_report.json"
SHARED_BASE_DIR = "shared_base"
SHARED_BASE_FILES = {"fused": "shared_base/base.fused.onnx", "int8": "shared_base/base.int8.onnx"}
SHARED_BASE_ADAPTER = "shared_base/adapter.onnx_adapter"
SHARED_BASE_INPUT_PREFIX = "adapter/"
"""A LoRA bundle's `--adapter_files` (`tfsft.export_shared_base`): the unmerged graphs, whose inputs
named with this prefix are the adapter and head weights, and the run's values of them."""

ORT_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
"""onnxruntime graph rewrites that every tfsft session of a bundle's model turns off. Export leaves
each residual Add and its LayerNormalization apart, because onnxruntime's CPU kernel of the fused
SkipLayerNormalization is several times slower than the two ops it replaces (bench/layer_norm.py);
onnxruntime would otherwise fuse them again as it loads the model. Its RMS-norm twin
(SkipSimplifiedLayerNormalization, fused by the same rewrite) runs at the speed of its two ops."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to a temp file beside `path`, then rename: readers never see half a file."""
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n"
    return write_text(path, text)


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the same directory; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a history CSV (epoch first, then metric columns), or [] when there is none."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(f)]


def read_decision(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Settings chosen on validation that later predictions must reuse (multilabel: the threshold)."""
    path = Path(run_dir) / REPORT_FILE
    if not path.is_file():
        return {}
    return dict(read_json(path, "evaluation report").get("decision") or {})


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"Missing {what}: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ArtifactError(f"Corrupt {what} {path}: {error}") from None


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_config(config: RunConfig, directory: str | os.PathLike) -> Path:
    """Write config.json beside the artifacts it explains."""
    return write_json(Path(directory) / CONFIG_FILE, config.to_dict())


def read_config(directory: str | os.PathLike) -> RunConfig:
    values = read_json(Path(directory) / CONFIG_FILE, "run config")
    try:
        return RunConfig.from_dict(values)
    except ConfigError as error:
        raise ArtifactError(f"{Path(directory) / CONFIG_FILE}: {error}") from None


def partial_dir_for(output_dir: str | os.PathLike) -> Path:
    """The work-in-progress directory of a run; it keeps backups so a killed run can resume."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.partial"


def is_finished_run(directory: str | os.PathLike) -> bool:
    return (Path(directory) / METRICS_FILE).is_file() and (Path(directory) / CONFIG_FILE).is_file()


def publish_dir(partial: Path, target: Path) -> None:
    """Rename a completed work directory (a run, a bundle) into place, replacing an older one
    only now; if the rename fails, the older one is put back."""
    if target.exists():
        old = target.parent / f".{target.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(partial, target)
        except OSError:
            os.replace(old, target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, target)


def has_bundle(run_dir: str | os.PathLike) -> bool:
    """Whether the run's ONNX export finished (a bundle is renamed into place only when complete)."""
    return (Path(run_dir) / ONNX_DIR / BUNDLE_FILE).is_file()


def find_bundle(path: str | os.PathLike) -> Path | None:
    """The ONNX bundle at `path`, or that of the run at `path` (RUN_DIR/onnx), or None."""
    for candidate in (Path(path), Path(path) / ONNX_DIR):
        if (candidate / BUNDLE_FILE).is_file():
            return candidate
    return None


def remove_stale_work_dirs(directory: str | os.PathLike, name: str) -> list[Path]:
    """Remove `.NAME.*.partial` work directories a killed process left in `directory`."""
    stale = [p for p in Path(directory).glob(f".{name}.*.partial") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def run_model_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / MODEL_DIR


def require_run_dir(run_dir: str | os.PathLike) -> Path:
    """Check that `run_dir` is a finished run and return it as a Path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"Run directory not found: {run_dir}")
    if not is_finished_run(run_dir):
        raise ArtifactError(f"{run_dir} is not a finished tfsft run (no {METRICS_FILE} / {CONFIG_FILE})")
    if not (run_dir / MODEL_DIR / "config.json").is_file():
        raise ArtifactError(f"{run_dir / MODEL_DIR} holds no saved model (config.json missing)")
    return run_dir
