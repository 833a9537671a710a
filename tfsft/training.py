"""Optimizer, schedule, strategy, callbacks, and `compile` + `fit`.

AdamW with linear warmup then linear decay, no weight decay on LayerNorm and bias, and global
gradient clipping (the BERT recipe), trained by Keras `fit` on length-batched `tf.data`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tfsft.modeling import tf  # TensorFlow with the legacy-Keras switch already applied

from tfsft.config import TrainConfig
from tfsft.data import LengthBatchedData

NO_DECAY = ("LayerNorm", "layer_norm", "bias")


class WarmupLinearDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """0 -> peak over `warmup_steps`, then linearly down to 0 at `total_steps`."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(int(total_steps), 1)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.cast(max(self.warmup_steps, 1), tf.float32)
        total = tf.cast(self.total_steps, tf.float32)
        rising = self.peak * step / warmup
        falling = self.peak * tf.maximum(total - step, 0.0) / tf.maximum(total - warmup, 1.0)
        if self.warmup_steps == 0:
            return self.peak * tf.maximum(total - step, 0.0) / total
        return tf.where(step < warmup, rising, falling)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}


def make_optimizer(config: TrainConfig, total_steps: int):
    """Keras AdamW over the warmup/decay schedule; call inside the strategy scope."""
    schedule = WarmupLinearDecay(config.learning_rate, round(total_steps * config.warmup_ratio), total_steps)
    optimizer = tf.keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=config.weight_decay,
        epsilon=1e-6,
        global_clipnorm=config.max_grad_norm,
        jit_compile=config.xla,
    )
    optimizer.exclude_from_weight_decay(var_names=list(NO_DECAY))
    if config.mixed_precision:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def make_strategy(name: str):
    """`auto`: MirroredStrategy on more than one GPU, else the default strategy.

    `mirrored` replicates over all GPUs, or over all logical CPU devices when there is no GPU
    (how the tests exercise it on a CPU-only machine).
    """
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def set_seed(seed: int, deterministic: bool) -> None:
    tf.keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def set_precision(mixed: bool) -> None:
    tf.keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")


def compile_classifier(model, config: TrainConfig, total_steps: int) -> None:
    """Compile with AdamW and cross-entropy on the logits; call inside the strategy scope."""
    model.compile(
        optimizer=make_optimizer(config, total_steps),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        jit_compile=config.xla,
    )


class EpochShuffle(tf.keras.callbacks.Callback):
    """Tell the batcher which epoch starts, so its order depends only on (seed, epoch)."""

    def __init__(self, data: LengthBatchedData):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.data.epoch = epoch


class StepLogger(tf.keras.callbacks.Callback):
    """Write training loss and learning rate to TensorBoard every `every` steps."""

    def __init__(self, log_dir: Path, every: int):
        super().__init__()
        self.every = every
        self.writer = tf.summary.create_file_writer(str(log_dir / "steps"))
        self.step = 0

    def on_train_begin(self, logs=None) -> None:
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self.step += 1
        step = self.step
        if step % self.every:
            return
        learning_rate = self.model.optimizer.learning_rate
        if isinstance(learning_rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = learning_rate(step)
        with self.writer.as_default(step=step):
            tf.summary.scalar("learning_rate", float(tf.keras.backend.get_value(learning_rate)))
            for key, value in (logs or {}).items():
                tf.summary.scalar(f"train_{key}", float(value))

    def on_train_end(self, logs=None) -> None:
        self.writer.flush()


class Timer(tf.keras.callbacks.Callback):
    """Wall time spent training in `fit`, without per-epoch validation, for examples/s."""

    def on_train_begin(self, logs=None) -> None:
        self.start = time.perf_counter()
        self.validation_seconds = 0.0
        self.seconds = 0.0

    def on_test_begin(self, logs=None) -> None:
        self.validation_start = time.perf_counter()

    def on_test_end(self, logs=None) -> None:
        self.validation_seconds += time.perf_counter() - self.validation_start

    def on_train_end(self, logs=None) -> None:
        self.seconds = time.perf_counter() - self.start - self.validation_seconds


def build_callbacks(
    config: TrainConfig, run_dir: Path, train_data: LengthBatchedData, best_weights: Path, validate: bool
) -> list:
    """The built-in callbacks; best-epoch tracking only when there are epochs to choose from."""
    monitor = f"val_{config.metric_for_best_model}"
    mode = "max" if config.metric_for_best_model == "accuracy" else "min"
    log_dir = run_dir / "logs"
    callbacks = [
        EpochShuffle(train_data),
        tf.keras.callbacks.TerminateOnNaN(),
        tf.keras.callbacks.BackupAndRestore(str(run_dir / "backup")),
        tf.keras.callbacks.TensorBoard(log_dir=str(log_dir), update_freq="epoch", profile_batch=0),
        StepLogger(log_dir, config.logging_steps),
        tf.keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True),
    ]
    if validate:
        callbacks.append(
            tf.keras.callbacks.ModelCheckpoint(
                str(best_weights), monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True
            )
        )
    if validate and config.early_stopping_patience:
        callbacks.append(
            tf.keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=config.early_stopping_patience)
        )
    return callbacks


def fit(
    model,
    train_data: LengthBatchedData,
    validation_data: LengthBatchedData,
    config: TrainConfig,
    run_dir: Path,
    extra_callbacks: Optional[Sequence] = None,
    verbose: int = 1,
) -> tuple[Any, float]:
    """Train, then restore the best epoch's weights. Returns (history, seconds spent in fit).

    A one-epoch run skips validation inside `fit`: there is no epoch to choose, and the
    caller evaluates the final model anyway.
    """
    best_weights = run_dir / "best_weights.h5"
    validate = config.num_train_epochs > 1
    timer = Timer()
    callbacks = build_callbacks(config, run_dir, train_data, best_weights, validate)
    callbacks += [timer, *(extra_callbacks or [])]
    history = model.fit(
        train_data.to_tf_dataset(),
        validation_data=validation_data.to_tf_dataset() if validate else None,
        epochs=config.num_train_epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    if best_weights.is_file():
        model.load_weights(str(best_weights))
        os.remove(best_weights)
    return history, timer.seconds
