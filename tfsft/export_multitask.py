"""Multi-task run -> one verified ONNX bundle: the encoder computed once, an output per head.

The graph has the model's inputs and one output per head, `logits_<task name>`, and goes through
the single-task export's stages (convert, fuse, quantize: `tfsft.export._write_models`). Parity
is checked head by head, each on its own task's validation examples exactly as a single-task run
of that task is checked (`_parity_set` on a `HeadView`, `check_outputs` on the head's output):
every fp32 model must match Keras on every head, else no bundle is written. bundle.json has the
common fields of a bundle, `"task": "multitask"`, and under `tasks` what each head's predictions
are decoded with (its task, labels, output, decision and the task's own settings), in the order
the run trained its heads; `tfsft.inference.Bundle.head` turns one entry into a single-task bundle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tfsft import artifacts, memory
from tfsft.config import MULTITASK, ExportConfig, RunConfig, TaskEntry
from tfsft.errors import ArtifactError
from tfsft.export import (
    FORMAT_VERSION,
    FP32_TOLERANCE,
    INPUT_DTYPE,
    OutputCheck,
    _parity_set,
    _ParitySet,
    _reread_validation,
    _write_models,
    bundle_work_dir,
    check_outputs,
    parity_score_name,
    publish_bundle,
    recorded_validation,
)
from tfsft.modeling import computes_in_float32, feature_names, float32_policy
from tfsft.multitask import TASKS_DIR
from tfsft.multitask_model import HeadView, MultiTaskModel, load_multitask
from tfsft.tasks import get_task
from tfsft.tokenize import TextEncoder

OUTPUT_PREFIX = "logits_"
"""A head's ONNX output is `logits_<task name>`."""


def output_name(task_name: str) -> str:
    return f"{OUTPUT_PREFIX}{task_name}"


@dataclass(frozen=True)
class _Head:
    """What one head is checked with: its task entry, decision, parity set and score."""

    entry: TaskEntry
    decision: dict[str, Any]
    parity: _ParitySet
    score_name: str

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def output(self) -> str:
        return output_name(self.entry.name)

    def keras_score(self) -> float:
        return self.parity.score(self.parity.keras["batch_8"], "batch_8")


def head_outputs(model: MultiTaskModel, features: dict[str, Any]) -> dict[str, Any]:
    """Every head's logits from one pass of the encoder, as the graph's named outputs."""
    return {output_name(name): logits for name, logits in model(features, training=False).items()}


def export_multitask_bundle(
    model: MultiTaskModel,
    run_dir: str | os.PathLike,
    validation: dict[str, tuple[Any, np.ndarray]],
    *,
    tolerance: float = FP32_TOLERANCE,
    settings: Optional[ExportConfig] = None,
) -> dict[str, Any]:
    """Export a multi-task model to `run_dir/onnx/` and return the export report.

    Args:
        model: the trained MultiTaskModel (a mixed-precision one is exported as a float32 copy,
            reloaded from the run's saved model).
        run_dir: a finished multi-task run (config.json, model/, tasks/<name>/).
        validation: task name -> (its validation examples, their label ids), for the parity checks.
        tolerance: largest accepted |ONNX - Keras| logit difference of the fp32 models, per head.
        settings: export settings in place of the run's own.

    Raises:
        ArtifactError: conversion failed, a head has no validation data, or an fp32 model
            disagrees with Keras on a head; then no bundle is written.
    """
    run_dir = Path(run_dir)
    config = artifacts.read_config(run_dir)
    if settings is not None:
        config = dataclasses.replace(config, export=settings)
    entries = {entry.name: entry for entry in config.tasks}
    tokenizer_file = artifacts.run_model_dir(run_dir) / artifacts.BUNDLE_TOKENIZER
    encoder = TextEncoder.from_file(tokenizer_file, config.data.max_seq_length)
    with bundle_work_dir(run_dir) as work:
        with contextlib.ExitStack() as stack:
            memory.release_memory()
            monitor = memory.active_monitor() or stack.enter_context(memory.StageMonitor())
            stack.enter_context(monitor.activate())
            with float32_policy():
                if not computes_in_float32(model):
                    model = load_multitask(artifacts.run_model_dir(run_dir), float32=True)
                names = list(feature_names(model))
                heads = []
                for spec in model.specs:
                    if spec.name not in entries or spec.name not in validation:
                        raise ArtifactError(
                            f"{run_dir}: the model's head {spec.name!r} has no task entry in config.json or no "
                            f"validation examples; the run's tasks are {sorted(entries)}"
                        )
                    with memory.stage(f"keras_logits/{spec.name}"):
                        heads.append(_head(model, entries[spec.name], validation[spec.name], run_dir, encoder, names))
                report = _build_multitask_bundle(model, config, work, encoder, heads, tolerance)
            del model
        report["stages"] = monitor.report()
        report["peak_rss_mb"] = round(monitor.peak_rss / memory.MB, 1)
        publish_bundle(work, run_dir, config, report, tokenizer_file)
    return report


def _head(model: MultiTaskModel, entry: TaskEntry, validation: tuple[Any, np.ndarray], run_dir: Path,
          encoder: TextEncoder, names: list[str]) -> _Head:
    """One head's parity set: its task's validation examples encoded as that task encodes them,
    with the Keras logits of the head, scored at the decision its evaluation recorded."""
    examples, labels = validation
    encoded, labels, reference = get_task(entry.task).encode(encoder, examples, labels, entry.data)
    decision = artifacts.read_decision(run_dir / TASKS_DIR / entry.name)
    score_name = parity_score_name(entry.task, entry.metric_for_best_model)
    parity = _parity_set(
        HeadView(model, entry.name), encoded, np.asarray(labels), encoder.pad_id, names, encoder.max_length, entry.task,
        decision, score_name, reference,
    )
    return _Head(entry, decision, parity, score_name)


def _build_multitask_bundle(
    model: MultiTaskModel, config: RunConfig, work: Path, encoder: TextEncoder, heads: list[_Head], tolerance: float
) -> dict[str, Any]:
    """Convert, fuse and quantize the one graph, then check every model on every head."""
    keras_scores = {head.name: head.keras_score() for head in heads}
    names, models = _write_models(model, work, config.export, outputs=head_outputs)
    per_head: dict[str, dict[str, Any]] = {
        head.name: {"task": head.entry.task, "output": head.output, f"keras_{head.score_name}": keras_scores[head.name]}
        for head in heads
    }
    report: dict[str, Any] = {**models.report(config.export, tolerance), "tasks": per_head}
    checks = {head.name: OutputCheck(head.parity, head.score_name, keras_scores[head.name], head.output) for head in heads}
    for name, checked in check_outputs(models, checks, tolerance).items():
        per_head[name].update(checked)
    if models.int8 is not None:
        report["int8"] = models.int8_report()
    report["sizes_bytes"] = models.remove_unshipped()
    metadata = _bundle_metadata(model, config, heads, names, encoder.pad_id, models.files)
    metadata["external_data"] = models.external_data_files()
    # Written unsorted: `tasks` keeps the order the run trained its heads in.
    artifacts.write_text(work / artifacts.BUNDLE_FILE, json.dumps(metadata, indent=2) + "\n")
    return report


def _bundle_metadata(
    model: MultiTaskModel, config: RunConfig, heads: list[_Head], names: list[str], pad_id: int, files: dict[str, str]
) -> dict[str, Any]:
    tasks = {}
    for head in heads:
        labels = list(model.specs[model.index(head.name)].labels)
        tasks[head.name] = {
            "task": head.entry.task,
            "labels": labels,
            "id2label": {str(i): label for i, label in enumerate(labels)},
            "output": head.output,
            "decision": head.decision,
            **get_task(head.entry.task).bundle_settings(head.entry.data),
        }
    return {
        "format_version": FORMAT_VERSION,
        "task": MULTITASK,
        "model_name": config.model.model_name_or_path,
        "model_type": getattr(model.config, "model_type", None),
        "max_seq_length": config.data.max_seq_length,
        "inputs": list(names),
        "input_dtype": INPUT_DTYPE,
        "pad_id": pad_id,
        "files": files,
        "tasks": tasks,
    }


def export_multitask_run(run_dir: str | os.PathLike, settings: Optional[ExportConfig] = None) -> dict[str, Any]:
    """Export a finished multi-task run (`tfsft export RUN_DIR`), checking each head on the
    validation examples its task was evaluated on (RUN/tasks/<name>/validation_examples.json;
    re-read from the task's data when the run recorded none)."""
    from tfsft.data import LabelMap, encode_labels

    run = artifacts.require_run_dir(run_dir)
    config = artifacts.read_config(run)
    with memory.StageMonitor() as monitor, monitor.activate():
        with memory.stage("load_model"):
            model = load_multitask(artifacts.run_model_dir(run), float32=True)
        specs = {spec.name: spec for spec in model.specs}
        validation = {}
        for entry in config.tasks:
            if entry.name not in specs:
                raise ArtifactError(f"{run}: config.json names task {entry.name!r}, which the saved model has no head for")
            examples = recorded_validation(run / TASKS_DIR / entry.name)
            if examples is None:
                examples = _reread_validation(config, entry.data, entry.task)
            labels = encode_labels(entry.task, LabelMap(specs[entry.name].labels), examples, entry.data.label_delimiter)
            validation[entry.name] = (examples, labels)
        return export_multitask_bundle(model, run, validation, settings=settings)
