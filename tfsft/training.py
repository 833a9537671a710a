"""Optimizer, schedule, strategy, callbacks, and `compile` + `fit`.

AdamW with linear warmup then linear decay, no weight decay on LayerNorm and bias, and global
gradient clipping (the BERT recipe), trained by Keras `fit` on length-batched `tf.data`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tfsft.modeling import tf  # TensorFlow with the legacy-Keras switch already applied

from tfsft import artifacts
from tfsft.artifacts import read_history
from tfsft.config import LOWER_IS_BETTER, TrainConfig
from tfsft.data import LengthBatchedData
from tfsft.errors import ArtifactError, ConfigError
from tfsft.tasks import get_task

NO_DECAY = ("LayerNorm", "layer_norm", "bias")
ENCODER_LAYER = re.compile(r"/(?:layer_\._|albert_layer_groups_\._)(\d+)/")
"""How transformers' TF encoders name the variables of layer i (`.../encoder/layer_._3/...`); ALBERT's
shared layers count as one layer per group (`.../albert_layer_groups_._0/...`)."""
EMBEDDING_PART = re.compile(r"/(?:embeddings|embeddings_project|embedding_hidden_mapping_in)/")
"""Embeddings, and the projections that map them to the hidden size (ELECTRA, ALBERT)."""
ENCODER_PART = re.compile(r"/(?:encoder|transformer)/")
"""The encoder stack: a weight here outside any numbered layer (MPNet's relative attention bias) serves them all."""


def encoder_layer_count(variable_names: Sequence[str]) -> int:
    """Number of encoder layers among these variables (0 when none is named like one)."""
    indices = [int(match.group(1)) for name in variable_names if (match := ENCODER_LAYER.search(name))]
    return max(indices) + 1 if indices else 0


def layer_lr_scale(variable_name: str, num_layers: int, decay: float) -> float:
    """Learning-rate factor of one variable under layer-wise decay (ULMFiT, ELECTRA, DeBERTa).

    The head (and pooler) trains at the full rate, encoder layer i at decay ** (num_layers - i),
    the embeddings at decay ** (num_layers + 1): the lower a layer, the more general what it
    learned in pretraining and the less it should move. An encoder weight that belongs to no one
    layer but serves all of them moves as the lowest layer does.
    """
    if EMBEDDING_PART.search(variable_name):
        return decay ** (num_layers + 1)
    if match := ENCODER_LAYER.search(variable_name):
        return decay ** (num_layers - int(match.group(1)))
    if ENCODER_PART.search(variable_name):
        return decay**num_layers
    return 1.0


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


class GradientAccumulation:
    """Optimizer mixin for --gradient_accumulation_steps N: sum each batch's gradients, and every
    N batches apply their mean as one optimizer step (tf-keras 2 has no such option; Keras 3's
    `gradient_accumulation_steps` is not available to it).

    `iterations`, and so the learning-rate schedule and Adam's bias correction, count optimizer
    steps. An epoch's last batches make one step of their own even when fewer than N, so every
    epoch is ceil(steps_per_epoch / N) steps and ends with nothing pending: what is validated,
    checkpointed and resumed after an epoch are the weights of all its batches. Clipping and
    weight decay act once per step, on the mean gradient, as with one N times larger batch.
    The summing happens on the gradients already reduced across replicas, in cross-replica
    context, where a branch may call the optimizer's own merge_call (as Keras' loss scaling does).
    """

    def __init__(
        self, *args, gradient_accumulation_steps: int = 1, steps_per_epoch: Optional[int] = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
        self.steps_per_epoch = steps_per_epoch
        if self.gradient_accumulation_steps > 1:
            with tf.init_scope():
                self._batches_seen = tf.Variable(0, name="batches_seen", dtype=tf.int64, trainable=False)
            self._variables.append(self._batches_seen)

    def build(self, var_list):
        super().build(var_list)
        if self.gradient_accumulation_steps > 1 and not hasattr(self, "_accumulated"):
            self._accumulated = [self.add_variable_from_reference(v, "accumulated_gradient") for v in var_list]

    def apply_gradients(self, grads_and_vars, name=None, skip_gradients_aggregation=False, **kwargs):
        if self.gradient_accumulation_steps == 1:
            return super().apply_gradients(
                grads_and_vars, name=name, skip_gradients_aggregation=skip_gradients_aggregation, **kwargs)
        grads_and_vars = list(grads_and_vars)
        with tf.init_scope():
            self.build([variable for _, variable in grads_and_vars])
        if not skip_gradients_aggregation and kwargs.pop("experimental_aggregate_gradients", True):
            grads_and_vars = self.aggregate_gradients(grads_and_vars)
        pairs = [(gradient, variable) for gradient, variable in grads_and_vars if gradient is not None]
        tf.__internal__.distribute.interim.maybe_merge_call(self._accumulate, self._distribution_strategy, pairs)
        return self.iterations

    def _accumulate(self, distribution, pairs):
        per_epoch = self.steps_per_epoch  # None: no epochs, a step every N batches
        # The batch's index in its epoch, and how many batches are summed once it is.
        position = self._batches_seen % per_epoch if per_epoch else self._batches_seen
        count = position % self.gradient_accumulation_steps + 1
        last_of_epoch = tf.equal(position + 1, per_epoch) if per_epoch else tf.constant(False)
        step_now = tf.logical_or(tf.equal(count, self.gradient_accumulation_steps), last_of_epoch)
        variables = [variable for _, variable in pairs]
        sums = [self._accumulated[self._index_dict[self._var_key(variable)]] for variable in variables]
        for (gradient, _), total in zip(pairs, sums):
            distribution.extended.update(total, _add_gradient, args=(gradient,), group=False)

        def apply_mean():
            def replica_step():
                means = [total / tf.cast(count, total.dtype) for total in sums]
                optimizer = super(GradientAccumulation, self)
                optimizer.apply_gradients(list(zip(means, variables)), skip_gradients_aggregation=True)

            if tf.distribute.in_cross_replica_context():
                distribution.extended.call_for_each_replica(replica_step)
            else:
                replica_step()
            for total in sums:
                distribution.extended.update(total, lambda t: t.assign(tf.zeros_like(t)), group=False)

        tf.__internal__.smart_cond.smart_cond(step_now, apply_mean, lambda: None)
        self._batches_seen.assign_add(1)


def _add_gradient(total, gradient):
    if isinstance(gradient, tf.IndexedSlices):
        values = tf.cast(gradient.values, total.dtype)
        return total.scatter_add(tf.IndexedSlices(values, gradient.indices, gradient.dense_shape))
    return total.assign_add(tf.cast(gradient, total.dtype))


class FusedAdamW(GradientAccumulation, tf.keras.optimizers.AdamW):
    """Keras AdamW whose per-variable Adam update is TensorFlow's fused `ResourceApplyAdam` kernel.

    Keras composes the update from about ten element-wise ops, each a pass over the variable
    and its two moments. For the 30522 x 384 word embeddings of MiniLM that is most of a gigabyte
    of memory traffic per step (its sparse gradient still decays both moments densely), measured
    at about a quarter of a training step on 2 CPU cores. The fused kernel makes one
    multithreaded pass with the same formula (m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
    w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)); sparse gradients are densified
    first, which is what Keras' dense moment decay amounts to. Weight decay is Keras' decoupled
    decay, w -= w * (wd * lr), with the two scalars multiplied first: one pass fewer per variable.
    With `layer_lr_decay` below 1, each variable's lr (for the update and the decay alike) is
    scaled by `layer_lr_scale`, fixed per variable when its update is traced.
    """

    def __init__(self, *args, layer_lr_decay: float = 1.0, num_layers: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_lr_decay = float(layer_lr_decay)
        self.num_layers = int(num_layers)
        self._skipped_when_unused: frozenset = frozenset()

    def skip_when_unused(self, variables) -> None:
        """On steps where one of `variables` has an all-zero gradient, leave it and its moments as
        they are: no momentum step, no weight decay. PyTorch's AdamW skips a parameter without a
        gradient; without this, a multi-task head would keep moving on its stale momentum (and
        decaying) through every batch of the other tasks."""
        self._skipped_when_unused = frozenset(self._var_key(variable) for variable in variables)

    def _learning_rate_of(self, variable):
        rate = tf.cast(self.learning_rate, variable.dtype)
        scale = layer_lr_scale(variable.name, self.num_layers, self.layer_lr_decay)
        return rate if scale == 1.0 else rate * tf.cast(scale, variable.dtype)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None:
            return

        def apply(distribution, variables, **kwargs):
            for variable in variables:
                if self._var_key(variable) not in self._skipped_when_unused:  # decayed in update_step
                    distribution.extended.update(variable, self._decay, group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)

    def _decay(self, variable):
        if self.weight_decay is None or not self._use_weight_decay(variable):
            return tf.no_op()
        rate = tf.cast(self.weight_decay, variable.dtype) * self._learning_rate_of(variable)
        return variable.assign_sub(variable * rate)

    def update_step(self, gradient, variable):
        if self.amsgrad:
            return super().update_step(gradient, variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        if self._var_key(variable) not in self._skipped_when_unused:
            return self._adam(gradient, variable)

        def decay_then_step():  # Keras' order: the decoupled decay, then the Adam update
            with tf.control_dependencies([self._decay(variable)]):
                step = self._adam(gradient, variable)
            with tf.control_dependencies([step]):
                return tf.constant(True)

        return tf.cond(tf.reduce_any(tf.not_equal(gradient, 0)), decay_then_step, lambda: tf.constant(False))

    def _adam(self, gradient, variable):
        dtype = variable.dtype
        local_step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._index_dict[self._var_key(variable)]
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle,
            m=self._momentums[index].handle,
            v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, local_step),
            beta2_power=tf.pow(beta_2, local_step),
            lr=self._learning_rate_of(variable),
            beta1=beta_1,
            beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype),
            use_locking=False,
        )


def skip_when_unused(optimizer, variables) -> None:
    """`FusedAdamW.skip_when_unused` on `optimizer`, or on the one it wraps for mixed precision."""
    getattr(optimizer, "inner_optimizer", optimizer).skip_when_unused(variables)


def optimizer_steps(total_steps: int, steps_per_epoch: int, accumulation: int) -> int:
    """Optimizer steps of a run of `total_steps` batches: ceil(steps_per_epoch / accumulation) an epoch."""
    if accumulation == 1:
        return total_steps
    return math.ceil(total_steps / steps_per_epoch) * math.ceil(steps_per_epoch / accumulation)


def make_optimizer(config: TrainConfig, total_steps: int, num_layers: int = 0, steps_per_epoch: Optional[int] = None):
    """AdamW (fused update) over the warmup/decay schedule; call inside the strategy scope.

    `total_steps` is the number of batches the run trains on, `steps_per_epoch` the batches of
    one epoch (default: all of them), which --gradient_accumulation_steps needs to end each
    epoch on a whole optimizer step. The schedule, --warmup_steps included, counts optimizer
    steps. `num_layers` is the encoder's depth, which --layer_lr_decay below 1 needs.
    """
    if config.layer_lr_decay != 1.0 and num_layers < 1:
        raise ConfigError(
            f"--layer_lr_decay {config.layer_lr_decay}: the model has no encoder layers named like "
            "transformers' (.../layer_._N/...), so there is nothing to decay by depth; use 1.0")
    per_epoch = max(int(steps_per_epoch or total_steps), 1)
    updates = optimizer_steps(total_steps, per_epoch, config.gradient_accumulation_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(updates * config.warmup_ratio)
    schedule = WarmupLinearDecay(config.learning_rate, warmup, updates)
    optimizer = FusedAdamW(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        steps_per_epoch=per_epoch,
        layer_lr_decay=config.layer_lr_decay,
        num_layers=num_layers,
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
    if name == "multiworker":
        return multiworker_strategy()
    gpus = tf.config.list_logical_devices("GPU")  # starts TF's runtime: too late for multiworker
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "mirrored":
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy(devices=[d.name for d in devices])
    return tf.distribute.get_strategy()


@functools.lru_cache(maxsize=None)
def multiworker_strategy():
    """The process's one MultiWorkerMirroredStrategy, from TF_CONFIG.

    It configures collective ops, which TF allows only before its runtime starts: create it
    before any model or tensor exists, and reuse it (a second one cannot be made).
    """
    if not os.environ.get("TF_CONFIG"):
        raise ConfigError("--strategy multiworker needs TF_CONFIG (the cluster and this worker's task); it is not set")
    return tf.distribute.MultiWorkerMirroredStrategy()


def is_chief(strategy) -> bool:
    """Whether this process writes the run: always, except on the non-chief workers of a cluster."""
    return bool(strategy.extended.should_checkpoint)


def set_seed(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TF, and make dropout draw from `tf.random.Generator`s.

    Keras 2's default (legacy stateful) dropout ops keep their state inside the op kernels,
    which no checkpoint can save: a resumed run would replay the first epoch's masks. A
    `tf.random.Generator` keeps its state in a variable that `DropoutRngBackup` saves. Must be
    called before the model is built (a layer picks its RNG kind when it is constructed).
    """
    tf.keras.backend.experimental.enable_tf_random_generator()
    tf.keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def set_precision(mixed: bool) -> None:
    tf.keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")


def compile_classifier(model, config: TrainConfig, total_steps: int) -> None:
    """Compile with AdamW and cross-entropy on the logits; call inside the strategy scope."""
    compile_model(model, config, total_steps, "classification")


def compile_model(
    model, config: TrainConfig, total_steps: int, task: str, steps_per_epoch: Optional[int] = None,
    objective: Optional[tuple[Any, list]] = None,
) -> None:
    """Compile with AdamW and the task's loss on the logits; call inside the strategy scope.

    `total_steps`: batches over the whole run; `steps_per_epoch`: batches per epoch (see make_optimizer).
    `objective`: (loss, metrics) instead of the task's (distillation's, say).
    """
    loss, metrics = objective or get_task(task).objective()
    num_layers = encoder_layer_count([variable.name for variable in model.trainable_variables])
    optimizer = make_optimizer(config, total_steps, num_layers, steps_per_epoch)
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=config.xla)


class ValidationScores(tf.keras.callbacks.Callback):
    """Add `val_<name>` scores computed outside Keras (Spearman, entity F1, ...) to the epoch logs.

    Must come before the callbacks that read them (best epoch, history, TensorBoard): Keras
    hands every callback the same logs dict, in list order.
    """

    def __init__(self, score: Callable[[Any], dict[str, float]]):
        super().__init__()
        self.score = score

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None:
            logs.update({f"val_{name}": float(value) for name, value in self.score(self.model).items()})


class EpochShuffle(tf.keras.callbacks.Callback):
    """Tell the batcher which epoch starts, so its order depends only on (seed, epoch).

    A resumed `fit` starts at a later epoch and calls `on_epoch_begin` with that epoch before
    the first batch is drawn (the generator runs lazily), so it replays the same order.
    """

    def __init__(self, data: LengthBatchedData):
        super().__init__()
        self.data = data

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.data.epoch = epoch


def _log(message: str) -> None:
    print(f"[tfsft] {message}", file=sys.stderr, flush=True)


def dropout_generators(model) -> list:
    """The `tf.random.Generator` of every random layer, in a stable order, created if needed.

    Keras keeps them untracked (`_random_generator`), so checkpoints and saved weights leave
    them out; `DropoutRngBackup` saves their state beside the BackupAndRestore checkpoint.
    Keras creates one lazily at the layer's first training call; creating it here first (inside
    `fit`, so under the strategy scope) gives it the same seed, and lets a resumed run restore it.
    """
    generators = []
    for layer in model.submodules:
        random_generator = getattr(layer, "_random_generator", None)
        if random_generator is None:
            continue
        random_generator._maybe_init()
        generator = getattr(random_generator, "_generator", None)
        if isinstance(generator, tf.random.Generator):
            generators.append(generator)
    return generators


class DropoutRngBackup(tf.keras.callbacks.Callback):
    """Save the dropout RNG state after every epoch; restore it when `fit` resumes later.

    Files are named by epoch, so the state matches the epoch BackupAndRestore restored even if
    a run was killed between the two saves. Runs before BackupAndRestore in `on_epoch_end`.
    """

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def on_train_begin(self, logs=None) -> None:
        self.first_epoch = True

    def _path(self, epoch: int) -> Path:
        return self.directory / f"epoch-{epoch}.npz"

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if not self.first_epoch:
            return
        self.first_epoch = False
        generators = dropout_generators(self.model)
        if epoch == 0 or not generators:
            return
        path = self._path(epoch - 1)
        if not path.is_file():
            raise ArtifactError(f"{path}: missing dropout RNG state of the backed-up epoch {epoch}; cannot resume exactly")
        with np.load(path) as saved:
            if len(saved.files) != len(generators):
                raise ArtifactError(f"{path}: RNG state of {len(saved.files)} layers, the model has {len(generators)}")
            for i, generator in enumerate(generators):
                generator.state.assign(saved[f"g{i}"])

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        generators = dropout_generators(self.model)
        if not generators:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(self._path(epoch)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{f"g{i}": g.state.numpy() for i, g in enumerate(generators)})


class EpochRecord(tf.keras.callbacks.Callback):
    """History CSV, best-epoch weights and early stopping, with all their state on disk.

    Keras' CSVLogger, ModelCheckpoint(save_best_only) and EarlyStopping keep their state in
    memory, so a resumed run would forget the best value so far, reset the patience and
    duplicate rows. Here history.csv is the state: on the first epoch of a (resumed) fit, rows
    of epochs that were not backed up are dropped, and the best value and the patience are
    recomputed from the rest. Files are replaced atomically, so a kill never leaves half of one.
    """

    def __init__(self, history: Path, best_weights: Path, monitor: Optional[str], mode: str, patience: Optional[int]):
        super().__init__()
        self.history = Path(history)
        self.best_weights = Path(best_weights)
        self.monitor = monitor
        self.better = np.greater if mode == "max" else np.less
        self.patience = patience

    def on_train_begin(self, logs=None) -> None:
        self.rows: Optional[list[dict[str, float]]] = None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.rows is None:
            self.rows = [row for row in read_history(self.history) if row["epoch"] < epoch]
            if epoch > 0:
                _log(f"resuming at epoch {epoch + 1} from the backup of epoch {epoch}")

    def _best(self) -> tuple[Optional[float], int]:
        best, best_epoch = None, -1
        for row in self.rows or []:
            value = row.get(self.monitor) if self.monitor else None
            if value is not None and (best is None or self.better(value, best)):
                best, best_epoch = value, int(row["epoch"])
        return best, best_epoch

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        row = {"epoch": float(epoch), **{key: float(value) for key, value in (logs or {}).items()}}
        if self.monitor:
            best, _ = self._best()
            current = row.get(self.monitor)
            if current is not None and not math.isnan(current) and (best is None or self.better(current, best)):
                self.best_weights.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.best_weights.with_name(f".{self.best_weights.stem}.tmp.h5")
                self.model.save_weights(str(tmp), save_format="h5")
                os.replace(tmp, self.best_weights)
        self.rows = [*(self.rows or []), row]
        keys = ["epoch", *sorted({key for r in self.rows for key in r} - {"epoch"})]
        lines = [",".join(keys)]
        for r in self.rows:
            lines.append(",".join(str(int(r[k])) if k == "epoch" else repr(r[k]) if k in r else "" for k in keys))
        artifacts.write_text(self.history, "\n".join(lines) + "\n")
        if self.monitor and self.patience:
            _, best_epoch = self._best()
            if best_epoch >= 0 and epoch - best_epoch >= self.patience:
                self.model.stop_training = True


class StepLogger(tf.keras.callbacks.Callback):
    """Write training loss and learning rate to TensorBoard every `every` steps.

    Points are kept in memory and written at the epoch's end, together with the backup, so a
    killed epoch leaves none behind and a resumed run does not log the same steps twice.
    """

    def __init__(self, log_dir: Path, every: int):
        super().__init__()
        self.every = every
        self.writer = tf.summary.create_file_writer(str(log_dir / "steps"))
        self.pending: list[tuple[int, dict[str, float]]] = []
        self.step_before = -1

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self.step_before = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        # The optimizer's step counter, not a count of calls: it survives a resume. Only the batch
        # that made the step logs it: under gradient accumulation the others leave it unchanged.
        step = int(self.model.optimizer.iterations.numpy())
        if step == self.step_before or step % self.every:
            return
        learning_rate = self.model.optimizer.learning_rate
        if isinstance(learning_rate, tf.keras.optimizers.schedules.LearningRateSchedule):
            learning_rate = learning_rate(step)
        values = {"learning_rate": float(tf.keras.backend.get_value(learning_rate))}
        values.update((f"train_{key}", float(value)) for key, value in (logs or {}).items())
        self.pending.append((step, values))

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        for step, values in self.pending:
            with self.writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(name, value)
        self.pending = []
        self.writer.flush()


class EpochFlushedTensorBoard(tf.keras.callbacks.TensorBoard):
    """Keras' TensorBoard, flushed at every epoch end: a run killed later keeps its epoch points
    (the writers otherwise hold them for up to two minutes), so a resumed run's logs are whole."""

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():
            writer.flush()


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
    """The built-in callbacks, in order: the BackupAndRestore checkpoint is saved last at an
    epoch's end, so everything it implies (history, best weights, RNG state) is on disk first.
    Best-epoch tracking only when there are epochs to choose from."""
    monitor = f"val_{config.metric_for_best_model}" if validate else None
    mode = "min" if config.metric_for_best_model in LOWER_IS_BETTER else "max"
    log_dir = run_dir / artifacts.LOGS_DIR
    backup_dir = run_dir / artifacts.BACKUP_DIR
    return [
        EpochShuffle(train_data),
        tf.keras.callbacks.TerminateOnNaN(),
        EpochFlushedTensorBoard(log_dir=str(log_dir), update_freq="epoch", profile_batch=0),
        StepLogger(log_dir, config.logging_steps),
        EpochRecord(run_dir / artifacts.HISTORY_FILE, best_weights, monitor, mode, config.early_stopping_patience),
        DropoutRngBackup(backup_dir / "rng"),
        tf.keras.callbacks.BackupAndRestore(str(backup_dir), delete_checkpoint=False),
    ]


def fit(
    model,
    train_data: LengthBatchedData,
    validation_data: LengthBatchedData,
    config: TrainConfig,
    run_dir: Path,
    extra_callbacks: Optional[Sequence] = None,
    verbose: int = 1,
    validation_scores: Optional[Callable[[Any], dict[str, float]]] = None,
) -> tuple[list[dict[str, float]], int, float]:
    """Train (or resume from `run_dir`'s backup), then restore the best epoch's weights.

    Returns (history rows of every epoch, resumed ones included; epochs run by this call;
    seconds spent training in this call). The backup and best weights stay in `run_dir` until
    the caller has saved the model, so a run killed after `fit` still resumes correctly.
    A one-epoch run skips validation inside `fit`: there is no epoch to choose, and the
    caller evaluates the final model anyway. `validation_scores(model)` adds metrics Keras
    cannot stream (Spearman, thresholded F1, entity F1) as `val_<name>` after each epoch, so
    the best epoch can be chosen by them.
    """
    best_weights = run_dir / artifacts.BEST_WEIGHTS
    validate = config.num_train_epochs > 1
    timer = Timer()
    callbacks = [ValidationScores(validation_scores)] if validation_scores and validate else []
    callbacks += build_callbacks(config, run_dir, train_data, best_weights, validate)
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
    epochs_run = len(history.history.get("loss", []))
    return read_history(run_dir / artifacts.HISTORY_FILE), epochs_run, timer.seconds
