"""The whole job as library calls: data -> model -> fit -> evaluate -> save (-> export).

`finetune(config)` is what `tfsft finetune` runs; `evaluate_run` is `tfsft evaluate`.
Everything that needs no TensorFlow (the data, the checkpoint, the output directory) is read and
checked before TensorFlow is imported, so bad input fails in a second with one line.
The run is written into a `.NAME.partial` directory and renamed into place once trained, evaluated
and saved; only then is it exported to ONNX, into the published run. A failed or killed export
never costs the training: the run stays complete, and `tfsft export RUN_DIR` or the same
finetune command again finishes the export.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tfsft import artifacts
from tfsft.config import ExportConfig, RunConfig, parse_class_weights
from tfsft.data import (
    Examples,
    LabelMap,
    LengthBatchedData,
    Splits,
    class_weights,
    encode_labels,
    load_splits,
    read_columns,
    read_unlabeled,
    sample,
    task_label_map,
)
from tfsft.checkpoint import (
    check_max_seq_length,
    check_tokenizer_fits,
    checkpoint_config,
    load_tokenizer,
    resolve_checkpoint,
    resolve_tokenizer,
    saved_label_map,
    text_encoder,
    weights_file,
)
from tfsft.errors import ArtifactError, ConfigError, DataError, ExportFailed, RunInterrupted, TfsftError, stage
from tfsft.streaming import StreamCache, open_cache
from tfsft.tasks import get_task


EVALUATIONS_DIR = "evaluations"
"""Where `evaluate_run` writes, one directory per evaluated file's stem, apart from the run's own reports."""
XLA_PAD_MULTIPLE = 8
"""XLA compiles once per input shape: padding to a multiple of 8 bounds the number of compiles."""


@dataclass(frozen=True)
class FinetuneResult:
    metrics: dict[str, Any]
    run_dir: Path


def default_output_dir(config: RunConfig) -> Path:
    return Path("saved_models") / f"{config.model.task}-{time.strftime('%Y%m%d-%H%M%S')}"


AUGMENTED_TEXTS_FILE = "augmented_texts.txt"
"""--augment_texts' new texts, one per line, in the run directory."""


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


def resolve_output_dir(config: RunConfig) -> tuple[RunConfig, Path]:
    """The config with its output dir fixed (a default one named now), and that dir."""
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config)
    return config.replace(output_dir=str(output_dir)), output_dir


def refuse_to_clobber(config: RunConfig, output_dir: Path) -> None:
    """Refuse an output dir that is a file, or holds a run or other files (unless overwriting)."""
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ConfigError(f"--output_dir {output_dir} is a file. Received: output_dir={str(output_dir)!r}")
        if any(output_dir.iterdir()) and not config.overwrite_output_dir:
            what = "a finished run" if artifacts.is_finished_run(output_dir) else "files"
            raise ConfigError(
                f"--output_dir {output_dir} already holds {what}; pass --overwrite_output_dir to replace it. "
                f"Received: output_dir={str(output_dir)!r}"
            )


def awaits_export(config: RunConfig, output_dir: Path) -> bool:
    """Whether `output_dir` holds a finished run of this same config whose ONNX export never
    completed (it failed, or the process was killed during it): rerunning the command then
    finishes the export instead of training again or refusing."""
    if not config.export.export or not artifacts.is_finished_run(output_dir) or artifacts.has_bundle(output_dir):
        return False
    try:
        saved = artifacts.read_config(output_dir)
    except TfsftError:
        return False
    columns = ("text_column", "text_pair_column", "label_column")  # the run recorded the ones it detected
    detected = {name: getattr(saved.data, name) for name in columns if getattr(config.data, name) is None}
    if config.train.few_shot == "auto":  # and what --few_shot auto resolved to
        detected["few_shot"] = saved.train.few_shot
    return saved.replace(overwrite_output_dir=False) == config.replace(overwrite_output_dir=False, **detected)


def open_partial_dir(config: RunConfig, output_dir: Path) -> Path:
    """Create the work-in-progress dir, or keep one a killed run left with the same config.

    A kept one holds Keras' BackupAndRestore state, so training resumes from its last epoch.
    """
    partial = artifacts.partial_dir_for(output_dir)
    if partial.exists():
        try:
            same = artifacts.read_config(partial) == config
        except Exception:
            same = False
        if same and (partial / artifacts.BACKUP_DIR).exists():
            _log(f"resuming the interrupted run in {partial}")
            return partial
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    artifacts.save_config(config, partial)
    return partial


def finetune(config: RunConfig, callbacks: Optional[Sequence] = None, verbose: int = 1) -> FinetuneResult:
    """Fine-tune, evaluate and save one run; returns its metrics and directory.

    Under `--strategy multiworker` every worker of the TF_CONFIG cluster runs this; only the
    chief writes the run. The others train in a scratch dir that is removed, and return their
    training metrics with the output dir they were given.
    """
    config = config.with_embedded_defaults()
    if config.tasks:
        from tfsft.multitask import finetune_multitask

        return finetune_multitask(config, callbacks, verbose)
    inputs = None
    if config.train.strategy == "multiworker":
        refuse_multiworker_resume(config)
        inputs = read_inputs(config)  # bad input fails here, before the strategy waits for the cluster
    config, scratch = _worker_config(config)
    if scratch is None:
        return _finetune(config, callbacks, verbose, inputs)
    output_dir = config.output_dir
    try:
        worker_config = config.replace(output_dir=str(scratch / "run"), overwrite_output_dir=False, export=False)
        result = _finetune(worker_config, callbacks, verbose, inputs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return FinetuneResult(metrics=result.metrics, run_dir=Path(output_dir) if output_dir else result.run_dir)


def _worker_config(config: RunConfig) -> tuple[RunConfig, Optional[Path]]:
    """(config, scratch dir of a non-chief worker or None).

    Creates the multi-worker strategy first: it configures collective ops, which TF allows only
    before anything else has run in the process.
    """
    if config.train.strategy != "multiworker":
        return config, None
    from tfsft.training import is_chief, make_strategy

    strategy = make_strategy("multiworker")
    if is_chief(strategy):
        return config, None
    resolver = strategy.cluster_resolver
    scratch = Path(tempfile.mkdtemp(prefix=f"tfsft-{resolver.task_type}-{resolver.task_id}-"))
    _log(f"{resolver.task_type} {resolver.task_id} is not the chief: training in {scratch}, which is removed after")
    return config, scratch


def refuse_multiworker_resume(config: RunConfig) -> None:
    """Refuse a multiworker run where a killed one left the chief's backup: the chief would resume
    from it and the other workers (whose state was in removed scratch dirs) from epoch 0, and the
    cluster would hang. Every worker checks, before it creates the strategy (which waits for the
    others); the non-chief ones see the chief's directory on one machine or a shared file system."""
    if not config.output_dir:
        return
    partial = artifacts.partial_dir_for(config.output_dir)
    if (partial / artifacts.BACKUP_DIR).exists():
        raise ConfigError(
            f"{partial} holds the backup of an interrupted --strategy multiworker run, which cannot resume (the "
            f"chief would restart from its last epoch and the other workers from the first, and the cluster would "
            f"hang): delete {partial} and run again to start over. Received: output_dir={config.output_dir!r}"
        )


@dataclass(frozen=True)
class RunInputs:
    """What a run reads before it trains: data, labels and checkpoint, all checked."""

    splits: Splits
    labels: dict[str, Optional[np.ndarray]]
    label_map: LabelMap
    weights: Optional[np.ndarray]
    stream: Optional[StreamCache]
    checkpoint: Path
    tokenizer: Any
    encoder: Any
    columns: dict[str, Optional[str]]
    unlabeled: Optional[Examples] = None
    """--unlabeled_file's texts (self-training under --few_shot)."""


def read_inputs(config: RunConfig) -> RunInputs:
    """Read and validate the data and the checkpoint. Needs no TensorFlow (except to write the
    token cache of --streaming), so bad input fails before it is imported."""
    task = config.model.task
    spec = get_task(task)
    delimiter = config.data.label_delimiter
    stream = None
    if config.data.streaming:
        checkpoint, tokenizer, encoder = _open_checkpoint(config)
        with stage("data"):
            stream, splits = _streaming_splits(config, encoder)
            label_map = stream.label_map
            train_labels = stream.label_ids()
    else:
        with stage("data"):
            splits = load_splits(config.data, config.train.seed, task=task)
            label_map = task_label_map(task, splits.train, delimiter)
            train_labels = encode_labels(task, label_map, splits.train, delimiter)
    with stage("data"):
        labels = {
            "train": train_labels,
            "validation": encode_labels(task, label_map, splits.validation, delimiter),
            "test": encode_labels(task, label_map, splits.test, delimiter) if splits.test is not None else None,
        }
    spec.check_splits(splits, config.data)
    spec.check_metric(config.train.metric_for_best_model, label_map, config.data.train_file or "the data")
    weight_spec = parse_class_weights(config.train.class_weights)
    weights = None if weight_spec is None else class_weights(weight_spec, label_map, labels["train"])
    _log(
        f"data: {len(train_labels)} train / {len(splits.validation)} validation"
        + (f" / {len(splits.test)} test" if splits.test is not None else "")
        + f" {spec.describe(label_map)}"
        + (" (training data streamed)" if stream is not None else "")
    )
    if stream is None:
        checkpoint, tokenizer, encoder = _open_checkpoint(config)
    columns = read_columns(splits)
    if config.train.teacher_model is not None:
        from tfsft.distillation import check_teacher, teacher_columns

        with stage("data"):
            check_teacher(config.train.teacher_model)
            teacher_columns(config.train.teacher_model, task, label_map)
    unlabeled = None
    if config.data.unlabeled_file is not None:
        with stage("data"):
            train_columns = getattr(splits.train, "columns", None) or (None, None, None)
            unlabeled = read_unlabeled(config.data.unlabeled_file, config.data, train_columns[:2])
            if (unlabeled.pairs is None) != (splits.train.pairs is None):
                raise DataError(
                    f"{config.data.unlabeled_file}: the training data are "
                    f"{'single texts' if splits.train.pairs is None else 'text pairs'}, the unlabelled texts are not"
                )
            unlabeled = sample(unlabeled, config.data.max_unlabeled_samples, config.train.seed)
        _log(f"data: {len(unlabeled)} unlabelled texts "
             f"{'for the teacher to label' if config.train.teacher_model else 'for self-training'}")
    return RunInputs(splits, labels, label_map, weights, stream, checkpoint, tokenizer, encoder, columns, unlabeled)


def _finetune(
    config: RunConfig, callbacks: Optional[Sequence] = None, verbose: int = 1, inputs: Optional[RunInputs] = None
) -> FinetuneResult:
    """The run itself, written to `config.output_dir` (see `finetune`).

    Inputs are read and validated before anything is written. If the run fails, its partial
    directory is removed, unless it was interrupted (Ctrl-C) after an epoch was backed up.

    Args:
        config: the run's settings; saved as config.json in the run directory.
        callbacks: extra Keras callbacks, run beside the built-in ones.
        verbose: Keras progress output (1: progress bar, 2: a line per epoch, 0: silent).
        inputs: the data and checkpoint when already read (`finetune` reads them before a
            multi-worker strategy exists); else read here.
    """
    config, output_dir = resolve_output_dir(config)
    if awaits_export(config, output_dir):
        _log(f"{output_dir} holds this run, trained, evaluated and saved, but not exported: finishing its ONNX export")
        export_finished_run(output_dir)
        return FinetuneResult(metrics=artifacts.read_json(output_dir / artifacts.METRICS_FILE, "metrics"), run_dir=output_dir)
    refuse_to_clobber(config, output_dir)
    inputs = inputs or read_inputs(config)
    config = config.replace(**inputs.columns)  # config.json names the columns that trained
    splits, labels, label_map, weights, stream = inputs.splits, inputs.labels, inputs.label_map, inputs.weights, inputs.stream
    checkpoint, tokenizer, encoder = inputs.checkpoint, inputs.tokenizer, inputs.encoder
    config = config.replace(few_shot=_resolve_few_shot(config, inputs))  # config.json says on or off

    from tfsft.training import set_precision, set_seed

    set_seed(config.train.seed, config.train.deterministic)
    set_precision(config.train.mixed_precision)
    metrics, model = train_into(config, output_dir, lambda partial: _train_and_save(
        config, splits, labels, label_map, checkpoint, tokenizer, encoder, partial, callbacks, verbose, weights, stream,
        inputs.unlabeled,
    ))
    if config.export.export:
        _log(f"run saved to {output_dir}; exporting it to ONNX")
        validation = (splits.validation, labels["validation"])
        _export_published(output_dir, lambda: _export_trained(model, output_dir, validation))
    _log(f"done: {output_dir}")
    return FinetuneResult(metrics=metrics, run_dir=output_dir)


def train_into(config: RunConfig, output_dir: Path, train) -> tuple[dict[str, Any], Any]:
    """Run `train(partial)` (fit, evaluate and save into the work-in-progress dir; returns (metrics,
    model)) and publish the dir as `output_dir`. If it fails, the partial dir is removed, unless it was
    interrupted (Ctrl-C) after an epoch was backed up, so the same command resumes."""
    partial = open_partial_dir(config, output_dir)
    _log(f"writing the run to {output_dir} (in progress: {partial})")
    try:
        metrics, model = train(partial)
    except KeyboardInterrupt:
        multiworker = config.train.strategy == "multiworker"
        if (partial / artifacts.BACKUP_DIR).exists() and not multiworker:
            raise RunInterrupted(
                f"interrupted; the partial run is kept in {partial}: run the same command with "
                f"--output_dir {output_dir} to resume from the last completed epoch"
            ) from None
        shutil.rmtree(partial, ignore_errors=True)
        why = "; a --strategy multiworker run cannot resume, so" if multiworker else " before the first epoch completed;"
        raise RunInterrupted(f"interrupted{why} nothing was kept") from None
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArtifactError(_write_failure(partial, output_dir, error)) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        artifacts.publish_dir(partial, output_dir)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise ArtifactError(_write_failure(partial, output_dir, error)) from None
    return metrics, model


def _resolve_few_shot(config: RunConfig, inputs: RunInputs) -> str:
    """'on' or 'off': what --few_shot (auto: by the smallest class and the checkpoint's pooling) means for this run."""
    from tfsft.few_shot import resolve_few_shot
    from tfsft.modeling import resolve_pooling

    if config.train.teacher_model is not None:
        return "off"  # distillation trains on the teacher's outputs instead (RunConfig refuses --few_shot on)

    model_type = checkpoint_config(inputs.checkpoint).get("model_type", "")
    pooling = resolve_pooling(config.model.pooling, inputs.checkpoint, model_type, config.model.task)
    on, why = resolve_few_shot(config, inputs.labels["train"], len(inputs.label_map.names), pooling)
    if config.train.few_shot != "off":
        _log(f"few-shot {'on' if on else 'off'}: {why}")
    if not on and config.data.unlabeled_file is not None:
        raise ConfigError(
            f"--unlabeled_file is read by the few-shot self-training, which is off for this run ({why}); pass "
            f"--few_shot on or leave --unlabeled_file out. Received: unlabeled_file={config.data.unlabeled_file!r}"
        )
    return "on" if on else "off"


def _open_checkpoint(config: RunConfig):
    """(checkpoint dir, tokenizer, TextEncoder), checked against --max_seq_length; needs no TensorFlow."""
    model = config.model
    with stage("model"):
        checkpoint = resolve_checkpoint(model.model_name_or_path, model.cache_dir)
        weights_file(checkpoint)
        check_max_seq_length(checkpoint, config.data.max_seq_length)
        if model.tokenizer_name is None:
            tokenizer = load_tokenizer(checkpoint)
        else:
            tokenizer = load_tokenizer(resolve_tokenizer(model.tokenizer_name, model.cache_dir))
            check_tokenizer_fits(checkpoint, tokenizer, model.tokenizer_name)
        return checkpoint, tokenizer, text_encoder(tokenizer, config.data.max_seq_length)


def _export_trained(model, run_dir: Path, validation: tuple[Examples, np.ndarray]) -> None:
    """Export the model just trained; LoRA adapters are merged into its dense weights first."""
    from tfsft.export import export_bundle
    from tfsft.lora import merge_lora

    merge_lora(model)
    export_bundle(model, run_dir, validation_data=validation)


def export_finished_run(run_dir: str | Path, settings: Optional[ExportConfig] = None) -> dict[str, Any]:
    """(Re-)export a finished run (`tfsft export`); a failure leaves the run as it was
    (an earlier bundle included) and says how to retry. `settings` replace the run's export
    settings. Returns the export report."""
    run = artifacts.require_run_dir(run_dir)
    from tfsft.export import export_run

    return _export_published(run, lambda: export_run(run, settings), just_trained=False)


def _export_published(run_dir: Path, export, just_trained: bool = True) -> Any:
    """Run `export()` on a published run; whatever goes wrong, the run stays as it is and the
    error says how to finish the export later."""
    retry = f"tfsft export {run_dir}"
    had_bundle = artifacts.has_bundle(run_dir)
    where = f"the run was saved to {run_dir} but its" if just_trained else f"the run in {run_dir} is unchanged but its"
    kept = "its earlier ONNX bundle is kept" if had_bundle else "the run is complete without a bundle"
    try:
        with stage("export"):
            return export()
    except KeyboardInterrupt:
        raise RunInterrupted(f"{where} ONNX export was interrupted; {kept}: finish the export with: {retry}") from None
    except Exception as error:
        detail = str(error) if isinstance(error, TfsftError) else f"{type(error).__name__}: {error}"
        raise ExportFailed(
            f"{where} ONNX export failed: {' '.join(detail.split())}; {kept}: retry the export with: {retry}",
            run_dir=str(run_dir),
        ) from error


def _write_failure(partial: Path, output_dir: Path, error: OSError) -> str:
    """One line for a failed write (disk full, permissions): what failed, and what was kept."""
    where = error.filename or partial
    kept = f"; the finished run already in {output_dir} is unchanged" if artifacts.is_finished_run(output_dir) else ""
    return f"{where}: cannot write the run ({error.strerror or error}); nothing was published{kept}"


def _streaming_splits(config: RunConfig, encoder) -> tuple[StreamCache, Splits]:
    """The training file's token cache (written on first use) and the in-memory validation and
    test examples; `Splits.train` is None, since training examples are only ever streamed."""
    data = config.data
    reader = get_task(config.model.task).read
    stream = open_cache(data.train_file, encoder, data, data.streaming_cache_dir)
    validation = sample(reader(data.validation_file, data), data.max_eval_samples, config.train.seed)
    test = sample(reader(data.test_file, data), data.max_predict_samples, config.train.seed) if data.test_file else None
    return stream, Splits(train=None, validation=validation, test=test)


def _train_and_save(
    config, splits, labels, label_map, checkpoint, tokenizer, encoder, partial, callbacks, verbose, weights=None, stream=None,
    unlabeled=None,
):
    """Build, fit, evaluate and save into `partial`; returns (metrics, model).

    `weights`: per-class loss weights by label id (--class_weights), fed as sample weights.
    `stream`: the training file's StreamCache under --streaming (then `splits.train` is None).
    `unlabeled`: --unlabeled_file's examples, for the self-training of --few_shot or for --teacher_model to label.
    """
    from tfsft.evaluation import keras_scores, predict_logits, score_model, task_metrics, write_evaluation
    from tfsft.lora import LoraSettings, apply_lora, freeze_head, parameter_counts, save_adapter
    from tfsft.modeling import build_classifier, feature_names, save_pretrained
    from tfsft.streaming import StreamingData
    from tfsft.training import compile_model, fit, is_chief, make_strategy

    task = config.model.task
    spec = get_task(task)
    references: dict[int, Any] = {}
    """What `task_metrics` scores each split's logits against (`Task.encode`), by id of its examples."""

    def encode(examples: Examples, y: np.ndarray):
        """Token ids, and the labels as the loss sees them (per-token ones aligned to word pieces;
        for question answering, the windows of each question and the answer's token positions)."""
        encoded, y, references[id(examples)] = spec.encode(encoder, examples, y, config.data)
        encoder.warn_truncated(encoded, examples.source)
        return encoded, y

    def reference(examples: Examples) -> Any:
        """What `task_metrics` scores logits against: the labels, or the questions and windows."""
        return references[id(examples)]

    if config.train.augment_texts and splits.train is not None and splits.train.pairs is not None:
        raise ConfigError(
            f"--augment_texts makes new single texts; {splits.train.source} has sentence pairs. "
            f"Received: augment_texts={config.train.augment_texts}"
        )
    with stage("model"):
        strategy = make_strategy(config.train.strategy)
        replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            model, load_report = build_classifier(
                checkpoint, label_map, config.model.model_name_or_path, task, config.model.pooling
            )
            lora = None
            if config.model.lora_rank:
                lora = LoraSettings.from_config(config.model, model.config.model_type)
                adapted = apply_lora(model, lora)
                if not spec.lora_trains_head:
                    freeze_head(model)
        parameters = parameter_counts(model)
    _log(
        f"model: {load_report.loaded} weights from {checkpoint / load_report.weights_file}; newly initialised: "
        f"{list(load_report.newly_initialized)}; pooling: {load_report.pooling}; "
        f"{replicas} replica(s) under {type(strategy).__name__}"
    )
    if lora is not None:
        _log(
            f"LoRA: rank {lora.rank} adapters on {adapted} {'/'.join(lora.targets)} layers; "
            f"{parameters['trainable_parameters']:,} of {parameters['total_parameters']:,} parameters train"
        )
    names = feature_names(model)
    pad_multiple = XLA_PAD_MULTIPLE if config.train.xla else 1
    objective, distillation_report = None, {}
    if stream is not None:
        train_data = StreamingData(
            stream, config.train.per_device_train_batch_size * replicas, seed=config.train.seed,
            pad_id=encoder.pad_id, feature_names=names, class_weights=weights,
        )
        train_samples = len(stream)
    else:
        train_encoded, train_targets = encode(splits.train, labels["train"])
        train_classes = labels["train"]
        if config.train.teacher_model is not None:
            with stage("teacher"):
                if config.train.augment_texts:
                    unlabeled = _with_augmented(config, splits.train, unlabeled, model, tokenizer, partial)
                train_encoded, train_targets, train_classes, objective, distillation_report = _distillation_targets(
                    config, splits.train, labels["train"], label_map, unlabeled, encoder, train_encoded, partial,
                )
        train_data = LengthBatchedData(
            train_encoded, train_targets, config.train.per_device_train_batch_size * replicas,
            shuffle=True, seed=config.train.seed, pad_id=encoder.pad_id, feature_names=names,
            sample_weights=None if weights is None else weights[np.asarray(train_classes, dtype=np.int64)],
            pad_multiple=pad_multiple,
        )
        train_samples = len(splits.train) + distillation_report.get("teacher_labelled_examples", 0)

    def eval_data(examples: Examples, y: np.ndarray) -> LengthBatchedData:
        return LengthBatchedData(
            *encode(examples, y), config.train.per_device_eval_batch_size * replicas,
            shuffle=False, pad_id=encoder.pad_id, feature_names=names,
            pad_multiple=pad_multiple,
        )

    validation_data = eval_data(splits.validation, labels["validation"])
    validation_reference = reference(splits.validation)
    few_shot = config.train.few_shot == "on"
    fit_config = config.train
    if few_shot:
        fit_config = dataclasses.replace(config.train, num_train_epochs=max(config.train.few_shot_end_to_end_epochs, 1))
    with strategy.scope():
        compile_model(
            model, fit_config, len(train_data) * fit_config.num_train_epochs, task, steps_per_epoch=len(train_data),
            objective=objective,
        )

    decision = {"threshold": config.train.multilabel_threshold}

    def validation_scores(current_model) -> dict[str, float]:
        logits = predict_logits(current_model, validation_data)
        scores, _ = task_metrics(task, validation_reference, logits, label_map, "eval", decision)
        return {name[len("eval_"):]: value for name, value in scores.items() if name != "eval_samples"}

    few_shot_report: dict[str, Any] = {}
    history, epochs_run, seconds = [], 0, 0.0
    with stage("evaluation"):
        initial_metrics = spec.before_training(model, validation_data, validation_reference)
    with stage("training"):
        if few_shot:
            from tfsft.few_shot import few_shot_train

            few_shot_report = few_shot_train(
                model, train_data.encoded, labels["train"], label_map.names, config.train, strategy=strategy,
                feature_names=names, pad_id=encoder.pad_id,
                unlabeled=None if unlabeled is None else unlabeled.encode(encoder, None)[0],
                class_weights=weights, verbose=verbose,
            )
        if not few_shot or config.train.few_shot_end_to_end_epochs:
            history, epochs_run, seconds = fit(
                model, train_data, validation_data, fit_config, partial, callbacks, verbose,
                validation_scores=None if keras_scores(task, config.train.metric_for_best_model) else validation_scores,
            )
        seconds += few_shot_report.get("few_shot_seconds", 0.0)
    if not is_chief(strategy):
        return _worker_metrics(history, epochs_run, seconds, replicas), model

    with stage("save"):
        from tfsft.export import record_validation

        if lora is None:
            save_pretrained(model, tokenizer, partial / artifacts.MODEL_DIR)
        else:
            save_adapter(
                model, tokenizer, partial / artifacts.MODEL_DIR, lora, checkpoint, config.model.model_name_or_path, task
            )
        record_validation(partial, splits.validation)
    with stage("evaluation"):
        metrics, report = score_model(task, model, validation_data, validation_reference, label_map, "eval", decision, config.data)
        write_evaluation(partial, metrics, report, "eval")
        if splits.test is not None:
            test_data = eval_data(splits.test, labels["test"])
            decided = report.get("decision")
            test_reference = reference(splits.test)
            test_metrics, test_report = score_model(
                task, model, test_data, test_reference, label_map, "test", decided, config.data
            )
            write_evaluation(partial, test_metrics, test_report, "test")
            metrics.update(test_metrics)
    train_tokens = None if stream is not None else int(train_data.encoded.lengths.sum())
    metrics.update(
        **initial_metrics,
        **training_metrics(history, epochs_run, seconds, train_samples, train_tokens, replicas, train_data.padding_fraction()),
        **({"train_windows": len(train_data.encoded)} if spec.windowed else {}),
        newly_initialized=list(load_report.newly_initialized),
        **parameters,
        few_shot=config.train.few_shot,
        **few_shot_report,
        **distillation_report,
    )
    if weights is not None:
        metrics["class_weights"] = {name: round(float(w), 6) for name, w in zip(label_map.names, weights)}
    shutil.rmtree(partial / artifacts.BACKUP_DIR, ignore_errors=True)
    (partial / artifacts.BEST_WEIGHTS).unlink(missing_ok=True)
    artifacts.write_json(partial / artifacts.METRICS_FILE, metrics)
    return metrics, model


def training_metrics(
    history: list[dict[str, float]], epochs_run: int, seconds: float, samples: int, tokens: Optional[int], replicas: int,
    padding_fraction: float,
) -> dict[str, Any]:
    """What metrics.json says of the training itself: time, speed, losses, epochs (resumed ones too)."""
    losses = [row["loss"] for row in history if "loss" in row]
    return dict(
        train_runtime_s=round(seconds, 3),
        train_examples_per_s=round(samples * epochs_run / max(seconds, 1e-9), 3) if epochs_run else None,
        train_tokens_per_s=round(tokens * epochs_run / max(seconds, 1e-9), 1) if epochs_run and tokens else None,
        train_samples=samples,
        train_loss_first_epoch=float(losses[0]) if losses else None,
        train_loss_last_epoch=float(losses[-1]) if losses else None,
        epochs=len(losses),
        epochs_resumed=len(losses) - epochs_run,
        replicas=replicas,
        padding_fraction=round(padding_fraction, 4),
    )


def _with_augmented(config, examples: Examples, unlabeled: Optional[Examples], model, tokenizer, partial: Path) -> Examples:
    """--augment_texts: new texts made from the training texts (`tfsft.augment`), after
    --unlabeled_file's if any, for the teacher to label; written to the run as augmented_texts.txt."""
    from tfsft.augment import augment_texts, neighbour_table
    from tfsft.modeling import word_embeddings

    count = config.train.augment_texts
    start = time.perf_counter()
    table = neighbour_table(
        tokenizer.get_vocab(), word_embeddings(model), (w for text in examples.texts for w in text.split())
    )
    try:
        texts = augment_texts(examples.texts, count, table, seed=config.train.seed)
    except ValueError as error:
        raise DataError(f"{examples.source}: --augment_texts {count}: {error}") from None
    artifacts.write_text(partial / AUGMENTED_TEXTS_FILE, "".join(text + "\n" for text in texts))
    _log(f"augmentation: {count} new texts from the training texts ({len(table)} words with neighbours) "
         f"in {time.perf_counter() - start:.1f} s")
    augmented = Examples(
        texts=texts, pairs=None, labels=[""] * count, rows=list(range(1, count + 1)), source=AUGMENTED_TEXTS_FILE,
    )
    if unlabeled is None:
        return augmented
    return dataclasses.replace(
        unlabeled, texts=unlabeled.texts + augmented.texts, labels=unlabeled.labels + augmented.labels,
        rows=unlabeled.rows + augmented.rows,
    )


def _distillation_targets(config, examples, labels, label_map, unlabeled, encoder, encoded, partial):
    """--teacher_model: the training examples (plus --unlabeled_file's, labelled by the teacher) with
    targets carrying the teacher's outputs, their classes (for --class_weights), the distillation
    objective and the report for metrics.json."""
    from tfsft.distillation import (
        TEACHER_LOGITS_FILE, TEACHER_UNLABELED_LOGITS_FILE, distillation_objective, mix_unlabeled, pack_targets,
        shared_cache, teacher_logits,
    )

    task, teacher, train = config.model.task, config.train.teacher_model, config.train
    spec = get_task(task)
    start = time.perf_counter()
    shared = shared_cache(train.teacher_cache_dir, teacher) if train.teacher_cache_dir else None
    outputs, source = teacher_logits(teacher, examples, task, label_map, partial / TEACHER_LOGITS_FILE, shared)
    hard = np.asarray(labels)
    report: dict[str, Any] = {
        "teacher_model": teacher, "distill_alpha": train.distill_alpha, "distill_temperature": train.distill_temperature,
        "teacher_examples": len(examples), "teacher_outputs_cached": source in ("run", "shared cache"),
    }
    agreement = spec.teacher_agreement(outputs, hard)
    if agreement is not None:
        report["teacher_train_agreement"] = round(agreement, 4)
    if unlabeled is not None:
        unlabeled_outputs, unlabeled_source = teacher_logits(
            teacher, unlabeled, task, label_map, partial / TEACHER_UNLABELED_LOGITS_FILE, shared
        )
        hard, outputs = mix_unlabeled(task, hard, outputs, unlabeled_outputs, config.train.multilabel_threshold or 0.5)
        encoded = encoded.concat(unlabeled.encode(encoder, None)[0])
        report["teacher_labelled_examples"] = len(unlabeled)
        if train.augment_texts:
            report["augmented_texts"] = train.augment_texts
    report["teacher_seconds"] = round(time.perf_counter() - start, 3)
    _log(
        f"distillation: teacher {teacher} outputs for {len(examples)} training"
        + (f" and {len(unlabeled)} unlabelled" if unlabeled is not None else "")
        + f" texts (training texts' {_teacher_outputs_source(source)}"
        + (f", unlabelled texts' {_teacher_outputs_source(unlabeled_source)}" if unlabeled is not None else "")
        + f"; {report['teacher_seconds']:.1f} s); "
        f"alpha {train.distill_alpha}, temperature {train.distill_temperature}"
    )
    objective = distillation_objective(task, len(label_map.names), train.distill_alpha, train.distill_temperature)
    classes = hard.reshape(len(hard), -1)[:, 0] if spec.class_weighted else hard
    return encoded, pack_targets(task, hard, outputs), classes, objective, report


def _teacher_outputs_source(source: str) -> str:
    """Where `teacher_logits` says the outputs came from, for the log."""
    return {"computed": "computed", "shared cache in part": "read in part from the shared cache, the rest computed"}.get(
        source, f"read from the {source}"
    )


def _worker_metrics(history: list[dict[str, float]], epochs_run: int, seconds: float, replicas: int) -> dict[str, Any]:
    """What a non-chief worker reports: evaluation needs no collectives, so only the chief runs it."""
    losses = [row["loss"] for row in history if "loss" in row]
    return {
        "train_runtime_s": round(seconds, 3), "epochs": len(losses), "epochs_resumed": len(losses) - epochs_run,
        "train_loss_last_epoch": float(losses[-1]) if losses else None, "replicas": replicas,
    }


def evaluate_run(run_dir: str, file: str, batch_size: Optional[int] = None, task: Optional[str] = None) -> dict[str, Any]:
    """Evaluate a saved run on another labeled file, with the run's own column settings.

    Writes metrics.json, eval_report.json and its plot into `RUN/evaluations/<file stem>/`
    (replaced whole, atomically, when that stem is evaluated again), never over the run's own
    reports, and returns the metrics. `task`: the head of a multi-task run to evaluate (with
    that task's column settings; written into `RUN/evaluations/<task>/<file stem>/`).
    """
    run = artifacts.require_run_dir(run_dir)
    config = artifacts.read_config(run)
    if config.tasks:
        from tfsft.multitask import evaluate_task

        metrics, report = evaluate_task(run, config, file, task, batch_size)
        return _write_file_evaluation(run / EVALUATIONS_DIR / str(task), file, metrics, report)
    if task is not None:
        raise ConfigError(f"--task names a head of a multi-task run; {run} is a {config.model.task} run. Received: task={task!r}")
    model_dir = run / artifacts.MODEL_DIR
    task = config.model.task
    label_map = saved_label_map(model_dir)
    examples = get_task(task).read(file, config.data)
    labels = encode_labels(task, label_map, examples, config.data.label_delimiter)
    tokenizer = load_tokenizer(model_dir)
    encoder = text_encoder(tokenizer, config.data.max_seq_length)
    from tfsft.evaluation import score_model
    from tfsft.lora import load_run_model
    from tfsft.modeling import feature_names

    model = load_run_model(model_dir, task)
    encoded, labels, reference = get_task(task).encode(encoder, examples, labels, config.data)
    encoder.warn_truncated(encoded, file)
    data = LengthBatchedData(
        encoded, labels, batch_size or config.train.per_device_eval_batch_size,
        shuffle=False, pad_id=encoder.pad_id, feature_names=feature_names(model),
    )
    decision = artifacts.read_decision(run)
    metrics, report = score_model(task, model, data, reference, label_map, "eval", decision, config.data)
    return _write_file_evaluation(run / EVALUATIONS_DIR, file, metrics, report)


def _write_file_evaluation(evaluations: Path, file: str, metrics: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """Write one file's evaluation into `evaluations/<file stem>/`, replacing an earlier one atomically."""
    from tfsft.evaluation import write_evaluation

    report["data_file"] = str(file)
    name = Path(file).stem.lstrip(".") or "data"  # never "..": that would be the run itself
    evaluations.mkdir(parents=True, exist_ok=True)
    artifacts.remove_stale_work_dirs(evaluations, name)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=evaluations))
    try:
        write_evaluation(work, metrics, report, "eval")
        artifacts.write_json(work / artifacts.METRICS_FILE, metrics)
        artifacts.publish_dir(work, evaluations / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"evaluation of {file} written to {evaluations / name}")
    return metrics
