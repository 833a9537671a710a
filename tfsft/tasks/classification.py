"""Single-label classification of a text or a text pair (sentiment, topic, intent, paraphrase)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from tfsft.tasks.base import Task, log_softmax, softmax

if TYPE_CHECKING:
    from tfsft.data import Examples, LabelMap


@dataclass(frozen=True)
class Prediction:
    """The predicted label of one input and the probability of every label."""

    label: str
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities}

    def csv_fields(self, labels: Sequence[str]) -> list[str]:
        return [self.label, *(f"{self.probabilities[label]:.6g}" for label in labels)]


def single_labels(examples: "Examples") -> "Examples":
    """Refuse a JSONL label list in a single-label task, naming the row."""
    from tfsft.errors import DataError

    for label, row in zip(examples.labels, examples.rows):
        if label.startswith("[") and label.endswith("]"):
            raise DataError(f"{examples.source}: row {row}: label {label} is a list; several labels per example need --task multilabel")
    return examples


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, label_map: "LabelMap", prefix: str = "eval"
) -> tuple[dict[str, float], dict[str, Any]]:
    """GLUE-style metrics plus a per-class report and the confusion matrix.

    Returns (metrics keyed `{prefix}_accuracy`, ..., report with `classification_report` and
    `confusion_matrix`). With two labels, `{prefix}_f1` is the F1 of label id 1, as GLUE reports.
    """
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, matthews_corrcoef

    predictions = logits.argmax(axis=-1)
    ids = list(range(len(label_map.names)))
    loss = float(-log_softmax(logits.astype(np.float64))[np.arange(len(labels)), labels].mean())
    metrics = {
        f"{prefix}_loss": loss,
        f"{prefix}_accuracy": float(accuracy_score(labels, predictions)),
        f"{prefix}_f1_macro": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        f"{prefix}_f1_weighted": float(f1_score(labels, predictions, labels=ids, average="weighted", zero_division=0)),
        f"{prefix}_mcc": float(matthews_corrcoef(labels, predictions)),
        f"{prefix}_samples": int(len(labels)),
    }
    if len(ids) == 2:
        metrics[f"{prefix}_f1"] = float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
    report = {
        "labels": list(label_map.names),
        "classification_report": classification_report(
            labels, predictions, labels=ids, target_names=list(label_map.names), output_dict=True, zero_division=0
        ),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }
    return metrics, report


class Classification(Task):
    name = "classification"
    summary = "one label per text or pair (sentiment, topic, intent, paraphrase)"
    best_metrics = ("accuracy", "f1", "f1_macro", "mcc", "loss")
    multitask = True
    keras_metrics = frozenset({"accuracy", "loss"})
    stratified = True
    class_weighted = True
    few_shot = True
    distilled = True
    streams = True
    distill_metric_name = "accuracy"

    def check_metric(self, metric: str, label_map: "LabelMap", source: str) -> None:
        from tfsft.errors import ConfigError

        if metric == "f1" and len(label_map.names) != 2:
            raise ConfigError(
                f"--metric_for_best_model f1 is the F1 of the second of two labels; {source} "
                f"has {len(label_map.names)}: use f1_macro. Received: metric_for_best_model=f1"
            )

    def label_map(self, train: "Examples", delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap

        return LabelMap.from_labels(single_labels(train).labels, train.source, train.label_names)

    def encode_labels(self, label_map: "LabelMap", examples: "Examples", delimiter: str) -> np.ndarray:
        return label_map.encode(single_labels(examples))

    def objective(self) -> tuple[Any, list]:
        from tfsft.modeling import tf

        return (
            tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            [tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )

    def metrics(self, reference, logits, label_map, prefix, decision):
        return classification_metrics(reference, logits, label_map, prefix)

    def decode(self, logits: np.ndarray, bundle: Any) -> list[Prediction]:
        labels = bundle.labels
        return [
            Prediction(label=labels[int(row.argmax())], probabilities={label: float(p) for label, p in zip(labels, row)})
            for row in softmax(logits)
        ]

    def distill_losses(self, hard, teacher, y_pred, temperature):
        from tfsft.modeling import tf

        labels = tf.cast(tf.reshape(hard, [-1]), tf.int32)
        hard_loss = tf.keras.losses.sparse_categorical_crossentropy(labels, y_pred, from_logits=True)
        if teacher is None:
            return hard_loss, None
        t = float(temperature)
        target = tf.nn.softmax(teacher / t, axis=-1)
        kl = tf.reduce_sum(target * (tf.math.log(target + 1e-12) - tf.nn.log_softmax(y_pred / t, axis=-1)), axis=-1)
        return hard_loss, kl * t * t

    def distill_metric(self, hard, y_pred):
        from tfsft.modeling import tf

        return tf.keras.metrics.sparse_categorical_accuracy(tf.reshape(hard, [-1, 1]), y_pred)

    def teacher_labels(self, teacher: np.ndarray, threshold: float) -> np.ndarray:
        return teacher.argmax(axis=1).astype(np.int64)


TASK = Classification()
