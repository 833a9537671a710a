"""Multi-task runs: one encoder, a head per task, trained jointly on single-task batches.

A config file's `tasks:` mapping names the tasks (classification, pairs, regression, multilabel,
NER in any mix), each with its own data; every other flag is shared. `finetune_multitask` is what
`finetune` runs for it: each task's data is read and checked as a single-task run's is (before
TensorFlow is imported), batches are drawn task by task with probabilities proportional to
(training examples)^(1/T) (`--task_sampling_temperature`), the best epoch is the one with the best
mean of the tasks' main validation metrics, and each task is evaluated and reported as a run of
its own would be, under `tasks/<name>/`. The ONNX bundle computes the encoder once and has one
output per head (`tfsft.export_multitask`).
"""

from __future__ import annotations

import dataclasses
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from tfsft import artifacts
from tfsft.config import RunConfig, TaskEntry
from tfsft.data import (
    LabelMap, LengthBatchedData, Splits, batches_dataset, encode_labels, load_splits, read_columns, task_label_map,
)
from tfsft.errors import DataError, stage
from tfsft.tasks import get_task

TASKS_DIR = "tasks"
"""Where each task's reports (and its validation record) go: RUN/tasks/<name>/."""
COLUMNS = ("text_column", "text_pair_column", "label_column")
"""The columns a run detects when not given (config.json records what they were)."""
CYCLE_STRIDE = 1000
"""A task drawn more often than it has batches starts a new pass: pass k of epoch e is shuffled as
epoch e * stride + k (distinct orders for the first thousand passes of each epoch)."""


def _log(message: str) -> None:
    from tfsft.pipeline import _log as log

    log(message)


@dataclass(frozen=True)
class TaskInputs:
    """One task's examples and labels, read and checked."""

    entry: TaskEntry
    splits: Splits
    label_map: LabelMap
    labels: dict[str, Optional[np.ndarray]]

    @property
    def name(self) -> str:
        return self.entry.name


def read_task_inputs(config: RunConfig) -> list[TaskInputs]:
    """Every task's splits, label map and labels, as a single-task run of it reads them; an error
    names the task. Needs no TensorFlow."""
    inputs = []
    for entry in config.tasks:
        spec = get_task(entry.task)
        delimiter = entry.data.label_delimiter
        with stage("data"):
            try:
                splits = load_splits(entry.data, config.train.seed, task=entry.task)
                label_map = task_label_map(entry.task, splits.train, delimiter)
                labels = {
                    split: None if examples is None else encode_labels(entry.task, label_map, examples, delimiter)
                    for split, examples in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))
                }
                spec.check_splits(splits, entry.data)
            except DataError as error:
                raise DataError(f"tasks.{entry.name}: {error}") from None
        _log(
            f"task {entry.name} ({entry.task}): {len(splits.train)} train / {len(splits.validation)} validation"
            + (f" / {len(splits.test)} test" if splits.test is not None else "")
            + f" {spec.describe(label_map)}"
        )
        detected = {name: value for name, value in read_columns(splits).items() if getattr(entry.data, name) is None}
        entry = dataclasses.replace(entry, data=dataclasses.replace(entry.data, **detected))
        inputs.append(TaskInputs(entry, splits, label_map, labels))
    return inputs


def _with_recorded_columns(config: RunConfig, output_dir: Path) -> RunConfig:
    """`config` with the columns each task left to detection set as the run in `output_dir` recorded
    them (config.json names the columns that trained), so the same command is recognised as that run."""
    try:
        saved = artifacts.read_config(output_dir)
    except Exception:
        return config
    if [entry.name for entry in saved.tasks] != [entry.name for entry in config.tasks]:
        return config
    entries = []
    for entry, recorded in zip(config.tasks, saved.tasks):
        detected = {name: getattr(recorded.data, name) for name in COLUMNS if getattr(entry.data, name) is None}
        entries.append(dataclasses.replace(entry, data=dataclasses.replace(entry.data, **detected)))
    return dataclasses.replace(config, tasks=tuple(entries))


def sampling_probabilities(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """Each task's share of the batches: proportional to size^(1/T) (T=1: to the sizes)."""
    weights = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    return weights / weights.sum()


def task_schedule(steps: int, probabilities: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The task of each of an epoch's `steps` batches: each task gets its probability's share of
    the steps (largest remainders round), in a seeded random order that changes every epoch."""
    exact = np.asarray(probabilities, dtype=np.float64) * steps
    counts = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - counts), kind="stable")
    counts[by_remainder[: steps - int(counts.sum())]] += 1
    rng = np.random.default_rng([seed, epoch, len(counts)])
    return rng.permutation(np.repeat(np.arange(len(counts)), counts))


class MultiTaskData:
    """Single-task batches of several tasks for one `model.fit`: features with a `task_id` column
    (the task's index), labels packed into float32 [batch, width] (`multitask_model.pack_labels`).

    Training (`probabilities` given): as many batches per epoch as all tasks have, drawn by
    `task_schedule`; a task drawn more often than it has batches starts another shuffled pass.
    Validation (None): every task's batches once, task after task.
    """

    def __init__(self, parts: Sequence[LengthBatchedData], probabilities: Optional[np.ndarray] = None, seed: int = 0):
        self.parts = list(parts)
        self.probabilities = probabilities
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.parts[0].feature_names

    def schedule(self) -> np.ndarray:
        if self.probabilities is None:
            return np.repeat(np.arange(len(self.parts)), [len(part) for part in self.parts])
        return task_schedule(len(self), self.probabilities, self.seed, self.epoch)

    def _passes(self, index: int) -> Iterator[Any]:
        part = self.parts[index]
        for number in itertools.count():
            if self.probabilities is not None:
                part.epoch = self.epoch * CYCLE_STRIDE + number
            yield from part

    def __iter__(self) -> Iterator[Any]:
        from tfsft.multitask_model import TASK_ID, pack_labels

        streams = [self._passes(index) for index in range(len(self.parts))]
        for task in self.schedule():
            features, labels = next(streams[task])
            yield {**features, TASK_ID: np.full(len(labels), task, dtype=np.int32)}, pack_labels(labels)

    def padding_fraction(self) -> float:
        total = sum(len(part) for part in self.parts)
        return sum(part.padding_fraction() * len(part) / total for part in self.parts)

    def to_tf_dataset(self):
        from tfsft.multitask_model import TASK_ID
        from tfsft.runtime import import_tensorflow

        tf = import_tensorflow()
        features = {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in self.feature_names}
        features[TASK_ID] = tf.TensorSpec([None], tf.int32, name=TASK_ID)
        return batches_dataset(self, (features, tf.TensorSpec([None, None], tf.float32)))


def finetune_multitask(config: RunConfig, callbacks: Optional[Sequence] = None, verbose: int = 1):
    """Fine-tune, evaluate and save a multi-task run, then export it; returns its FinetuneResult."""
    from tfsft.pipeline import (
        FinetuneResult, _export_published, _open_checkpoint, awaits_export, export_finished_run, refuse_to_clobber,
        resolve_output_dir, train_into,
    )

    config, output_dir = resolve_output_dir(config.replace(few_shot="off"))
    if awaits_export(_with_recorded_columns(config, output_dir), output_dir):
        _log(f"{output_dir} holds this run, trained, evaluated and saved, but not exported: finishing its ONNX export")
        export_finished_run(output_dir)
        return FinetuneResult(metrics=artifacts.read_json(output_dir / artifacts.METRICS_FILE, "metrics"), run_dir=output_dir)
    refuse_to_clobber(config, output_dir)
    tasks = read_task_inputs(config)
    config = dataclasses.replace(config, tasks=tuple(task.entry for task in tasks))  # with the columns that trained
    checkpoint, tokenizer, encoder = _open_checkpoint(config)

    from tfsft.training import set_precision, set_seed

    set_seed(config.train.seed, config.train.deterministic)
    set_precision(config.train.mixed_precision)
    metrics, model = train_into(
        config, output_dir,
        lambda partial: _train_and_save(config, tasks, checkpoint, tokenizer, encoder, partial, callbacks, verbose),
    )
    if config.export.export:
        from tfsft.export_multitask import export_multitask_bundle

        _log(f"run saved to {output_dir}; exporting it to ONNX")
        validation = {task.name: (task.splits.validation, task.labels["validation"]) for task in tasks}
        _export_published(output_dir, lambda: export_multitask_bundle(model, output_dir, validation))
    _log(f"done: {output_dir}")
    return FinetuneResult(metrics=metrics, run_dir=output_dir)


def _train_and_save(config: RunConfig, tasks: list[TaskInputs], checkpoint, tokenizer, encoder, partial: Path,
                    callbacks, verbose) -> tuple[dict[str, Any], Any]:
    """Build, fit, evaluate and save into `partial`; returns (metrics, model)."""
    from tfsft.evaluation import predict_logits, task_metrics, write_evaluation
    from tfsft.export import record_validation
    from tfsft.lora import parameter_counts
    from tfsft.multitask_model import HeadSpec, HeadView, LabelLayout, build_multitask, save_multitask
    from tfsft.pipeline import XLA_PAD_MULTIPLE, training_metrics
    from tfsft.training import compile_model, fit, make_strategy, skip_when_unused

    train = config.train
    with stage("model"):
        strategy = make_strategy(train.strategy)
        replicas = strategy.num_replicas_in_sync
        specs = [HeadSpec(task.name, task.entry.task, task.label_map.names) for task in tasks]
        with strategy.scope():
            model, load_report = build_multitask(checkpoint, specs, config.model.model_name_or_path, config.model.pooling)
        parameters = parameter_counts(model)
    _log(
        f"model: {load_report.loaded} encoder weights from {checkpoint / load_report.weights_file}; heads: "
        + ", ".join(f"{spec.name} ({spec.task}, {spec.outputs} outputs)" for spec in specs)
        + f"; pooling: {load_report.pooling}; {replicas} replica(s) under {type(strategy).__name__}"
    )
    names = model.inputs_accepted
    pad_multiple = XLA_PAD_MULTIPLE if train.xla else 1
    references: dict[tuple[str, str], Any] = {}

    def batches(task: TaskInputs, split: str, shuffle: bool) -> LengthBatchedData:
        examples = getattr(task.splits, split)
        encoded, labels, references[task.name, split] = get_task(task.entry.task).encode(
            encoder, examples, task.labels[split], task.entry.data
        )
        encoder.warn_truncated(encoded, examples.source)
        size = (train.per_device_train_batch_size if shuffle else train.per_device_eval_batch_size) * replicas
        return LengthBatchedData(
            encoded, labels, size, shuffle=shuffle, seed=train.seed, pad_id=encoder.pad_id, feature_names=names,
            pad_multiple=pad_multiple,
        )

    train_parts = [batches(task, "train", True) for task in tasks]
    validation_parts = [batches(task, "validation", False) for task in tasks]
    sizes = [len(task.splits.train) for task in tasks]
    probabilities = sampling_probabilities(sizes, train.task_sampling_temperature)
    train_data = MultiTaskData(train_parts, probabilities, train.seed)
    validation_data = MultiTaskData(validation_parts)
    model.prepare_training([LabelLayout.of(part.labels) for part in train_parts], [task.entry.loss_weight for task in tasks])
    steps = len(train_data)
    with strategy.scope():
        compile_model(model, train, steps * train.num_train_epochs, config.model.task, steps_per_epoch=steps, objective=(None, []))
        skip_when_unused(model.optimizer, [variable for head in model.heads for variable in head.trainable_variables])
    decision = {"threshold": train.multilabel_threshold}

    def scores(current, split: str, parts: dict[str, LengthBatchedData], prefix: str,
               decisions: Optional[dict[str, Any]] = None) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
        """{task name: (metrics, report)} of the model on one split of the tasks in `parts` (their batches)."""
        return {
            task.name: task_metrics(
                task.entry.task, references[task.name, split], predict_logits(HeadView(current, task.name), parts[task.name]),
                task.label_map, prefix, decision if decisions is None else decisions[task.name],
            )
            for task in tasks if task.name in parts
        }

    validation_by_task = {task.name: part for task, part in zip(tasks, validation_parts)}

    def validation_scores(current) -> dict[str, float]:
        results = scores(current, "validation", validation_by_task, "eval")
        values = {f"{name}_{key[len('eval_'):]}": v for name, (m, _) in results.items() for key, v in m.items() if key != "eval_samples"}
        values["mean"] = mean_main_metric(results, tasks, "eval")
        return values

    _log(
        "task sampling (T=" + f"{train.task_sampling_temperature:g}): "
        + ", ".join(
            f"{task.name} {p:.3f}" + (f" (loss x{task.entry.loss_weight:g})" if task.entry.loss_weight != 1 else "")
            for task, p in zip(tasks, probabilities)
        )
        + f"; {steps} batches per epoch"
    )
    with stage("training"):
        history, epochs_run, seconds = fit(model, train_data, validation_data, train, partial, callbacks, verbose,
                                           validation_scores=validation_scores)
    with stage("save"):
        save_multitask(model, tokenizer, partial / artifacts.MODEL_DIR)
        for task in tasks:
            (partial / TASKS_DIR / task.name).mkdir(parents=True, exist_ok=True)
            record_validation(partial / TASKS_DIR / task.name, task.splits.validation)
    with stage("evaluation"):
        evaluated = scores(model, "validation", validation_by_task, "eval")
        decisions = {name: report.get("decision") or {} for name, (_, report) in evaluated.items()}
        test_parts = {task.name: batches(task, "test", False) for task in tasks if task.splits.test is not None}
        tested = scores(model, "test", test_parts, "test", decisions)
        for task in tasks:
            directory = partial / TASKS_DIR / task.name
            write_evaluation(directory, *evaluated[task.name], "eval")
            if task.name in tested:
                write_evaluation(directory, *tested[task.name], "test")
    train_tokens = sum(int(part.encoded.lengths.sum()) for part in train_parts)
    metrics: dict[str, Any] = {}
    for index, task in enumerate(tasks):
        metrics[task.name] = {
            "task": task.entry.task,
            **evaluated[task.name][0],
            **(tested[task.name][0] if task.name in tested else {}),
            "metric_for_best_model": task.entry.metric_for_best_model,
            "train_samples": sizes[index],
            "sampling_probability": round(float(probabilities[index]), 6),
            "loss_weight": task.entry.loss_weight,
            "padding_fraction": round(train_parts[index].padding_fraction(), 4),
        }
    metrics["eval_mean"] = mean_main_metric(evaluated, tasks, "eval")
    if tested:
        metrics["test_mean"] = mean_main_metric(tested, tasks, "test")
    metrics.update(
        tasks=[task.name for task in tasks],
        **training_metrics(history, epochs_run, seconds, sum(sizes), train_tokens, replicas, train_data.padding_fraction()),
        task_sampling_temperature=train.task_sampling_temperature,
        newly_initialized=[f"{spec.name} head" for spec in specs],
        **parameters,
    )
    shutil.rmtree(partial / artifacts.BACKUP_DIR, ignore_errors=True)
    (partial / artifacts.BEST_WEIGHTS).unlink(missing_ok=True)
    artifacts.write_json(partial / artifacts.METRICS_FILE, metrics)
    return metrics, model


def mean_main_metric(results: dict[str, tuple[dict[str, float], Any]], tasks: Sequence[TaskInputs], prefix: str) -> float:
    """The mean, over the tasks `results` (task name -> (metrics, report)) holds, of each one's main
    metric (its metric_for_best_model)."""
    return float(np.mean([
        results[task.name][0][f"{prefix}_{task.entry.metric_for_best_model}"] for task in tasks if task.name in results
    ]))


def evaluate_task(run: Path, config: RunConfig, file: str, name: Optional[str], batch_size: Optional[int]):
    """(metrics, report) of one head of a finished multi-task run on a labelled file read with that
    task's column settings, at the decision (threshold) its validation chose."""
    from tfsft.checkpoint import load_tokenizer, text_encoder
    from tfsft.errors import ConfigError
    from tfsft.evaluation import predict_logits, task_metrics
    from tfsft.multitask_model import HeadView, load_multitask

    names = [entry.name for entry in config.tasks]
    if name not in names:
        raise ConfigError(f"{run} is a multi-task run: --task must name one of its tasks {names}. Received: task={name!r}")
    entry = config.tasks[names.index(name)]
    model_dir = run / artifacts.MODEL_DIR
    model = load_multitask(model_dir)
    head = model.specs[model.index(name)]
    spec = get_task(entry.task)
    examples = spec.read(file, entry.data)
    labels = encode_labels(entry.task, head.label_map(), examples, entry.data.label_delimiter)
    encoder = text_encoder(load_tokenizer(model_dir), config.data.max_seq_length)
    encoded, labels, reference = spec.encode(encoder, examples, labels, entry.data)
    encoder.warn_truncated(encoded, file)
    data = LengthBatchedData(
        encoded, labels, batch_size or config.train.per_device_eval_batch_size, shuffle=False, pad_id=encoder.pad_id,
        feature_names=model.inputs_accepted,
    )
    decision = artifacts.read_decision(run / TASKS_DIR / name)
    logits = predict_logits(HeadView(model, name), data)
    return task_metrics(entry.task, reference, logits, head.label_map(), "eval", decision)
