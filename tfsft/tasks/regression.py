"""Regression: one score per text or pair (similarity, rating)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tfsft.tasks.base import Task

if TYPE_CHECKING:
    from tfsft.data import Examples, LabelMap

REGRESSION_OUTPUT = "score"
"""Name of the single output of a regression head (its one-entry label map)."""


@dataclass(frozen=True)
class Score:
    """The predicted value of a regression bundle for one input."""

    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score}

    def csv_fields(self, labels: Sequence[str]) -> list[str]:
        return [f"{self.score:.6g}"]


def encode_targets(examples: "Examples") -> np.ndarray:
    """Float regression targets of `examples`; a target that is not a finite number names its row."""
    from tfsft.errors import DataError

    out = np.empty(len(examples), dtype=np.float32)
    for i, (label, row) in enumerate(zip(examples.labels, examples.rows)):
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(f"{examples.source}: row {row}: regression target {label!r} is not a finite number")
        out[i] = value
    return out


def regression_metrics(
    targets: np.ndarray, logits: np.ndarray, label_map: "LabelMap", prefix: str = "eval"
) -> tuple[dict[str, float], dict[str, Any]]:
    """MSE (also the loss), Pearson and Spearman correlation of the single output with the targets.

    A correlation with a constant prediction (or constant targets) is undefined; it is reported
    as 0.0, "no correlation", so the best-epoch choice and metrics.json stay plain numbers.
    """
    from scipy.stats import pearsonr, spearmanr

    predictions = np.asarray(logits, dtype=np.float64).reshape(len(targets), -1)[:, 0]
    targets = np.asarray(targets, dtype=np.float64)
    mse = float(np.mean((predictions - targets) ** 2))
    varying = len(targets) > 1 and np.ptp(predictions) > 0 and np.ptp(targets) > 0
    metrics = {
        f"{prefix}_loss": mse,
        f"{prefix}_mse": mse,
        f"{prefix}_pearson": float(pearsonr(predictions, targets)[0]) if varying else 0.0,
        f"{prefix}_spearman": float(spearmanr(predictions, targets)[0]) if varying else 0.0,
        f"{prefix}_samples": int(len(targets)),
    }
    report = {
        "output": label_map.names[0],
        "targets": {"mean": float(targets.mean()), "std": float(targets.std())},
        "predictions": {"mean": float(predictions.mean()), "std": float(predictions.std())},
    }
    return metrics, report


class Regression(Task):
    name = "regression"
    summary = "one score per text or pair (similarity, rating)"
    best_metrics = ("spearman", "pearson", "mse", "loss")
    multitask = True
    label_counts = (1, 1)
    distilled = True
    distill_metric_name = "mse"

    def label_map(self, train: "Examples", delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap

        return LabelMap((REGRESSION_OUTPUT,))

    def encode_labels(self, label_map: "LabelMap", examples: "Examples", delimiter: str) -> np.ndarray:
        return encode_targets(examples)

    def objective(self) -> tuple[Any, list]:
        from tfsft.modeling import tf

        # Keras squeezes the [batch, 1] logits to the [batch] targets before comparing them.
        return tf.keras.losses.MeanSquaredError(), [tf.keras.metrics.MeanSquaredError(name="mse")]

    def metrics(self, reference, logits, label_map, prefix, decision):
        return regression_metrics(reference, logits, label_map, prefix)

    def agreement(self, candidate, reference, tolerance, threshold, token_labels, lengths) -> tuple[Optional[float], int]:
        """A score is no label: nothing to agree on (the logit bound alone judges parity)."""
        return None, 0

    def decode(self, logits: np.ndarray, bundle: Any) -> list[Score]:
        return [Score(float(value)) for value in logits[:, 0]]

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        return ["score"]

    def distill_losses(self, hard, teacher, y_pred, temperature):
        from tfsft.modeling import tf

        prediction = tf.reshape(y_pred, [-1])
        hard_loss = tf.square(prediction - tf.reshape(tf.cast(hard, y_pred.dtype), [-1]))
        return hard_loss, None if teacher is None else tf.square(prediction - tf.reshape(teacher, [-1]))

    def distill_metric(self, hard, y_pred):
        from tfsft.modeling import tf

        return tf.square(tf.reshape(tf.cast(y_pred, tf.float32), [-1]) - tf.reshape(hard, [-1]))

    def teacher_labels(self, teacher: np.ndarray, threshold: float) -> np.ndarray:
        return teacher[:, 0].astype(np.float32)

    def teacher_agreement(self, teacher: np.ndarray, labels: np.ndarray) -> Optional[float]:
        return None

    def teacher_columns(self, teacher, teacher_labels, label_map) -> np.ndarray:
        return np.zeros(1, dtype=np.int64)


TASK = Regression()
