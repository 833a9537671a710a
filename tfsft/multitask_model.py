"""One encoder with a head per task, trained on single-task batches (multi-task fine-tuning).

The encoder is the checkpoint's main layer (`TFBertMainLayer`, ...) exactly as the single-task
classifiers load it; each head is what transformers puts on top of it for that task: dropout and
a dense layer over the pooled text (sequence tasks: the pooler over [CLS], or the masked mean of
the last hidden states under mean pooling) or over every token (NER). A batch carries its task's
index in the `task_id` feature; `train_step` runs the encoder once and only that task's head and
loss (`tf.switch_case`), so tasks with different label shapes share one `model.fit`.

`HeadView` makes one head look like a single-task transformers model (`.config`, `.logits`), so
evaluation and the ONNX parity checks treat it as they treat any run's model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import numpy as np

from tfsft.data import LabelMap
from tfsft.errors import ArtifactError
from tfsft.modeling import (
    build_classifier,
    feature_names,
    float32_policy,
    head_class,
    quiet_transformers,
    tf,
)
from tfsft.tasks import get_task

MULTITASK_FILE = "multitask.json"
"""What a multi-task model directory holds beside the encoder's config.json: pooling, inputs and heads."""
WEIGHTS_FILE = "multitask_weights.h5"
FORMAT_VERSION = 1
TASK_ID = "task_id"
"""The feature that names a batch's task (its index in the model's heads)."""


@dataclass(frozen=True)
class HeadSpec:
    """One head: the task name it answers to, the task it does and the outputs it has."""

    name: str
    task: str
    labels: tuple[str, ...]

    @property
    def reads_tokens(self) -> bool:
        """A per-token head (NER) reads every hidden state; the others read the pooled text."""
        return not get_task(self.task).sequence_head

    @property
    def outputs(self) -> int:
        """Logits per text (or token): one per label (regression's one label is its score)."""
        return len(self.labels)

    def label_map(self) -> LabelMap:
        return LabelMap(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "task": self.task, "labels": list(self.labels)}


@dataclass(frozen=True)
class LabelLayout:
    """How a task's labels travel in the packed float32 [batch, width] label tensor of a mixed
    `model.fit`: `width` columns (None: one per token) of `dtype`, `rank` 1 for one value per text."""

    width: Optional[int]
    dtype: str
    rank: int

    @staticmethod
    def of(labels: np.ndarray) -> "LabelLayout":
        """The layout of one task's encoded training labels (an object array holds per-token ids)."""
        if labels.dtype == object:
            return LabelLayout(None, "int32", 2)
        width = 1 if labels.ndim == 1 else int(labels.shape[1])
        return LabelLayout(width, "int32" if np.issubdtype(labels.dtype, np.integer) else "float32", labels.ndim)


def pack_labels(labels: np.ndarray) -> np.ndarray:
    """One batch's labels as float32 [batch, width] (label ids up to 2^24 are exact in float32)."""
    labels = np.asarray(labels)
    return labels.reshape(len(labels), -1).astype(np.float32)


class TaskHead(tf.keras.layers.Layer):
    """transformers' classifier head: dropout, then a dense layer (float32 under mixed precision)."""

    def __init__(self, outputs: int, dropout: float, initializer_range: float, **kwargs: Any):
        super().__init__(**kwargs)
        self.dropout = tf.keras.layers.Dropout(dropout)
        self.classifier = tf.keras.layers.Dense(
            outputs, kernel_initializer=tf.keras.initializers.TruncatedNormal(stddev=initializer_range),
            name="classifier", dtype="float32",
        )

    def call(self, hidden, training=False):
        return self.classifier(self.dropout(tf.cast(hidden, tf.float32), training=training))


class MultiTaskModel(tf.keras.Model):
    """The shared encoder and one `TaskHead` per `HeadSpec`; `call` returns every head's logits."""

    def __init__(self, encoder, config, specs: Sequence[HeadSpec], pooling: str, inputs: Sequence[str], **kwargs: Any):
        super().__init__(name="multitask", **kwargs)
        self.encoder = encoder
        self.config = config
        self.specs = tuple(specs)
        self.pooling = pooling
        self.inputs_accepted = tuple(inputs)
        rate = getattr(config, "classifier_dropout", None)
        rate = config.hidden_dropout_prob if rate is None else rate
        self.heads = [
            TaskHead(spec.outputs, rate, config.initializer_range, name=f"head_{index}")
            for index, spec in enumerate(self.specs)
        ]
        # Untracked: its two counters are no model weights (parameter counts, saved weights, the export).
        self.__dict__["loss_tracker"] = tf.keras.metrics.Mean(name="loss")
        self.layouts: Optional[tuple[LabelLayout, ...]] = None
        self.task_losses: tuple = ()
        self.loss_weights: tuple[float, ...] = ()

    def prepare_training(self, layouts: Sequence[LabelLayout], loss_weights: Optional[Sequence[float]] = None) -> None:
        """Before `fit`: each task's label layout in the packed label tensor, its loss (made here:
        a task's objective builds Keras metrics, which a traced step may not create) and the
        weight its loss is multiplied by (1 each by default)."""
        self.layouts = tuple(layouts)
        self.task_losses = tuple(get_task(spec.task).objective()[0] for spec in self.specs)
        self.loss_weights = tuple(float(w) for w in loss_weights) if loss_weights is not None else (1.0,) * len(self.specs)
        if len(self.loss_weights) != len(self.specs):
            raise ValueError(f"{len(self.loss_weights)} loss weights for {len(self.specs)} heads")

    @property
    def input_signature(self) -> dict[str, Any]:
        return {name: tf.TensorSpec([None, None], tf.int32, name=name) for name in self.inputs_accepted}

    @property
    def metrics(self) -> list:
        return [self.loss_tracker]

    def index(self, name: str) -> int:
        for index, spec in enumerate(self.specs):
            if spec.name == name:
                return index
        raise KeyError(name)

    def encode(self, features: dict[str, Any], training: bool = False):
        """(last hidden states, pooled text): the encoder runs once for whichever heads read it."""
        inputs = {name: features[name] for name in self.inputs_accepted if name in features}
        outputs = self.encoder(**inputs, training=training, return_dict=True)
        hidden = outputs.last_hidden_state
        if self.pooling == "mean":
            mask = tf.cast(features["attention_mask"], hidden.dtype)[:, :, None]
            pooled = tf.reduce_sum(hidden * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1e-9)
        else:
            pooled = outputs.pooler_output
            if pooled is None:
                pooled = hidden[:, 0]
        return hidden, pooled

    def head_logits(self, index: int, hidden, pooled, training: bool = False):
        return self.heads[index](hidden if self.specs[index].reads_tokens else pooled, training=training)

    def call(self, features, training=False):
        hidden, pooled = self.encode(features, training)
        return {spec.name: self.head_logits(i, hidden, pooled, training) for i, spec in enumerate(self.specs)}

    def task_loss(self, features, labels, training: bool):
        """The loss of the batch's task (its `task_id`), from that task's head only, times the
        task's loss weight."""
        if self.layouts is None:
            raise RuntimeError("call MultiTaskModel.prepare_training before training")
        hidden, pooled = self.encode(features, training)
        length = tf.shape(features["input_ids"])[1]

        def branch(index: int):
            layout, loss, weight = self.layouts[index], self.task_losses[index], self.loss_weights[index]

            def compute():
                logits = self.head_logits(index, hidden, pooled, training)
                target = unpack_labels(labels, layout, length)
                values = loss.call(target, logits) if isinstance(loss, tf.keras.losses.Loss) else loss(target, logits)
                return weight * tf.reduce_mean(tf.cast(values, tf.float32))

            return compute

        task_id = tf.cast(features[TASK_ID][0], tf.int32)
        return tf.switch_case(task_id, [branch(index) for index in range(len(self.specs))])

    def train_step(self, data):
        features, labels = data
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            loss = self.task_loss(features, labels, training=True)
            scaled = loss / replicas  # the optimizer sums the replicas' gradients
        self.optimizer.minimize(scaled, self.trainable_variables, tape=tape)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        features, labels = data
        self.loss_tracker.update_state(self.task_loss(features, labels, training=False))
        return {"loss": self.loss_tracker.result()}

    def dummy_features(self) -> dict[str, Any]:
        ids = tf.constant([[2, 3, 4, 5]], dtype=tf.int32)
        values = {"input_ids": ids, "attention_mask": tf.ones_like(ids), "token_type_ids": tf.zeros_like(ids)}
        return {name: values[name] for name in self.inputs_accepted}


def unpack_labels(labels, layout: LabelLayout, length):
    """A task's labels out of the packed float32 tensor, in the shape and dtype its loss takes."""
    width = length if layout.width is None else layout.width
    values = tf.cast(labels[:, :width], getattr(tf, layout.dtype))
    return values[:, 0] if layout.rank == 1 else values


class HeadView:
    """One head of a MultiTaskModel as a single-task transformers model: `view(features).logits`,
    a `.config` whose labels are the head's, and the model's weights and inputs."""

    def __init__(self, model: MultiTaskModel, name: str):
        self.model = model
        self.index = model.index(name)
        self.spec = model.specs[self.index]
        config = copy.deepcopy(model.config)
        config.num_labels = self.spec.outputs
        config.id2label = {i: label for i, label in enumerate(self.spec.labels)}
        config.label2id = {label: i for i, label in enumerate(self.spec.labels)}
        self.config = config
        self.input_signature = model.input_signature

    @property
    def weights(self) -> list:
        return self.model.weights

    def __call__(self, features, training=False):
        hidden, pooled = self.model.encode(features, training)
        return SimpleNamespace(logits=self.model.head_logits(self.index, hidden, pooled, training))


def build_multitask(checkpoint: Path, specs: Sequence[HeadSpec], name: str = "", pooling: str = "auto"):
    """(MultiTaskModel with fresh heads, LoadReport of its encoder): the encoder loads as a
    single-task classifier's does (tf_model.h5 or model.safetensors, pooling resolved the same way)."""
    sequence_task = next((spec.task for spec in specs if not spec.reads_tokens), specs[0].task)
    classifier, report = build_classifier(checkpoint, LabelMap(("a", "b")), name, sequence_task, pooling)
    model = _assemble(classifier, specs, report.pooling)
    return model, report


def _assemble(classifier, specs: Sequence[HeadSpec], pooling: str) -> MultiTaskModel:
    encoder = getattr(classifier, classifier.base_model_prefix)
    model = MultiTaskModel(encoder, classifier.config, specs, pooling, feature_names(classifier))
    model(model.dummy_features(), training=False)
    return model


def save_multitask(model: MultiTaskModel, tokenizer, directory: Path) -> None:
    """The encoder's config and the tokenizer in transformers' format, the heads in multitask.json,
    and every weight in one Keras weights file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    description = {
        "format_version": FORMAT_VERSION,
        "pooling": model.pooling,
        "inputs": list(model.inputs_accepted),
        "heads": [spec.to_dict() for spec in model.specs],
        "weights": WEIGHTS_FILE,
    }
    (directory / MULTITASK_FILE).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    model.save_weights(str(directory / WEIGHTS_FILE))


def read_heads(directory: Path) -> tuple[str, tuple[HeadSpec, ...]]:
    """(pooling, heads) of a saved multi-task model directory."""
    path = Path(directory) / MULTITASK_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MULTITASK_FILE}; not a saved multi-task model")
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        specs = tuple(HeadSpec(str(h["name"]), str(h["task"]), tuple(str(x) for x in h["labels"])) for h in description["heads"])
        return str(description["pooling"]), specs
    except (ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path}: corrupt multi-task description ({type(error).__name__}: {error})") from None


def load_multitask(directory: Path, float32: bool = False) -> MultiTaskModel:
    """A saved multi-task model, rebuilt from its config and heads and given its weights
    (`float32`: built in float32 whatever the Keras policy, as an export needs)."""
    from transformers import AutoConfig

    directory = Path(directory)
    pooling, specs = read_heads(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"{directory}: no {WEIGHTS_FILE}; the multi-task model is incomplete")
    try:
        with quiet_transformers(), (float32_policy() if float32 else _unchanged()):
            config = AutoConfig.from_pretrained(str(directory))
            config.num_labels = 2
            sequence_task = next((spec.task for spec in specs if not spec.reads_tokens), specs[0].task)
            classifier = head_class(sequence_task, pooling, config.model_type).from_config(config)
            classifier(classifier.dummy_inputs, training=False)
            model = _assemble(classifier, specs, pooling)
            model.load_weights(str(weights))
    except ArtifactError:
        raise
    except Exception as error:
        raise ArtifactError(f"{directory}: corrupt multi-task model ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    return model


class _unchanged:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
