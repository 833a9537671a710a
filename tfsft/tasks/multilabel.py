"""Multilabel classification: any number of labels per text or pair, one sigmoid per label."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tfsft.tasks.base import Task, sigmoid

if TYPE_CHECKING:
    from tfsft.data import Examples, LabelMap

DEFAULT_MULTILABEL_THRESHOLD = 0.5
"""Probability at which a multilabel bundle that recorded no threshold predicts a label."""
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Decision thresholds tried on validation (0.05 to 0.95)."""
CROSS_FIT_SEED = 0
"""Seed of the split of a validation set into the two halves that score each other's threshold."""


@dataclass(frozen=True)
class LabelSet:
    """The predicted labels of a multilabel bundle for one input (probability >= the threshold)."""

    labels: list[str]
    probabilities: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "probabilities": self.probabilities}

    def csv_fields(self, labels: Sequence[str]) -> list[str]:
        return [json.dumps(self.labels, ensure_ascii=False), *(f"{self.probabilities[label]:.6g}" for label in labels)]


def label_set(label: str, delimiter: str, source: str, row: int) -> list[str]:
    """The labels of one multilabel cell: a JSON list (`["a", "b"]`, `[]`) or `a|b` split on `delimiter`."""
    from tfsft.errors import DataError

    if label.startswith("["):
        try:
            values = json.loads(label)
        except ValueError:
            values = None
        if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise DataError(f"{source}: row {row}: label {label!r} is not a JSON list of label names")
        names = [str(v).strip() for v in values]
    else:
        names = [part.strip() for part in label.split(delimiter)]
    if any(not name for name in names):
        raise DataError(f"{source}: row {row}: empty label name in {label!r} (delimiter {delimiter!r})")
    return list(dict.fromkeys(names))


def encode_label_sets(label_map: "LabelMap", examples: "Examples", delimiter: str) -> np.ndarray:
    """Multi-hot float32 [examples, labels]; a label never seen in training names its row."""
    from tfsft.errors import DataError

    out = np.zeros((len(examples), len(label_map.names)), dtype=np.float32)
    for i, (label, row) in enumerate(zip(examples.labels, examples.rows)):
        for name in label_set(label, delimiter, examples.source, row):
            label_id = label_map.ids.get(name)
            if label_id is None:
                raise DataError(
                    f"{examples.source}: row {row}: label {name!r} never appears in the training data "
                    f"(known labels: {list(label_map.names)})"
                )
            out[i, label_id] = 1.0
    return out


def best_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold of THRESHOLDS with the best micro F1 (the lowest one on ties)."""
    from sklearn.metrics import f1_score

    scores = [f1_score(labels, probabilities >= t, average="micro", zero_division=0) for t in THRESHOLDS]
    return THRESHOLDS[int(np.argmax(scores))]


def cross_fitted_predictions(
    labels: np.ndarray, probabilities: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Predictions where no example is scored at a threshold chosen with its own labels.

    The examples are split into two seeded halves; each half is predicted at the best threshold
    of the other. Returns (0/1 predictions, each example's half, the threshold each half got).
    """
    folds = np.zeros(len(labels), dtype=np.int64)
    folds[np.random.default_rng(CROSS_FIT_SEED).permutation(len(labels))[len(labels) // 2 :]] = 1
    thresholds = tuple(best_threshold(labels[folds != fold], probabilities[folds != fold]) for fold in (0, 1))
    predicted = (probabilities >= np.asarray(thresholds)[folds][:, None]).astype(np.int64)
    return predicted, folds, thresholds


def multilabel_metrics(
    labels: np.ndarray, logits: np.ndarray, label_map: "LabelMap", prefix: str = "eval", threshold: Optional[float] = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """Binary cross-entropy, micro/macro F1 and exact-match accuracy at a probability threshold.

    With `threshold` (fixed by the user, or chosen on validation and passed on to the test set)
    the scores are taken at it. Without, the best one on these labels is chosen (on validation
    only): it is the decision shipped (`{prefix}_threshold`, report["decision"]). Scores taken at
    it on the labels that chose it would overstate it, so the plain scores are cross-fitted
    (`cross_fitted_predictions`) and the in-sample ones are reported beside them as
    `{prefix}_<score>_in_sample`; report["threshold_selection"] says which is which.
    """
    labels = np.asarray(labels).astype(np.int64)
    x = np.asarray(logits, dtype=np.float64)
    loss = float(np.mean(np.maximum(x, 0) - x * labels + np.log1p(np.exp(-np.abs(x)))))
    probabilities = sigmoid(x)
    tuned = threshold is None
    if tuned:
        threshold = best_threshold(labels, probabilities)
    at_threshold = (probabilities >= threshold).astype(np.int64)
    metrics = {f"{prefix}_loss": loss}
    if tuned and len(labels) >= 2:
        predicted, folds, fold_thresholds = cross_fitted_predictions(labels, probabilities)
        metrics.update(_thresholded_scores(labels, predicted, prefix))
        in_sample = _thresholded_scores(labels, at_threshold, prefix)
        metrics.update({f"{name}_in_sample": value for name, value in in_sample.items()})
        selection = {
            "threshold": float(threshold),
            "tuned_on": f"all {len(labels)} examples scored here: the threshold of {THRESHOLDS[0]}-{THRESHOLDS[-1]} "
                        "with the best micro F1; it is the decision shipped and used on the test set",
            "scored": f"cross-fitted: the examples are split into two halves (seed {CROSS_FIT_SEED}) and each "
                      "half is scored at the threshold tuned on the other, so no example is scored at a threshold "
                      f"chosen with its own labels; {prefix}_f1_micro, {prefix}_f1_macro, {prefix}_exact_match and "
                      "per_label are these. The *_in_sample scores are at the shipped threshold on the examples "
                      "that chose it (optimistic).",
            "fold_thresholds": [float(t) for t in fold_thresholds],
            "fold_sizes": np.bincount(folds, minlength=2).tolist(),
        }
    else:
        predicted = at_threshold
        metrics.update(_thresholded_scores(labels, predicted, prefix))
        how = "tuned on these same examples (too few to cross-fit)" if tuned else "fixed before scoring"
        selection = {"threshold": float(threshold), "tuned_on": how, "scored": "at the threshold"}
    metrics.update({f"{prefix}_threshold": float(threshold), f"{prefix}_samples": int(len(labels))})
    report = {
        "labels": list(label_map.names),
        "decision": {"threshold": float(threshold)},
        "threshold_selection": selection,
        "per_label": _per_label(labels, predicted, label_map),
    }
    return metrics, report


def _thresholded_scores(labels: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {
        f"{prefix}_f1_micro": float(f1_score(labels, predicted, average="micro", zero_division=0)),
        f"{prefix}_f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        f"{prefix}_exact_match": float((predicted == labels).all(axis=1).mean()),
    }


def _per_label(labels: np.ndarray, predicted: np.ndarray, label_map: "LabelMap") -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, average=None, zero_division=0)
    return {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(label_map.names, precision, recall, f1, support)
    }


def threshold_logit(threshold: Optional[float]) -> float:
    """The logit at which a label's probability reaches `threshold` (the default one when None)."""
    chosen = DEFAULT_MULTILABEL_THRESHOLD if threshold is None else float(threshold)
    return float(np.log(chosen / (1.0 - chosen)))


class Multilabel(Task):
    name = "multilabel"
    summary = "any number of labels per text or pair"
    best_metrics = ("f1_micro", "f1_macro", "loss")
    multitask = True
    few_shot = True
    distilled = True
    distill_metric_name = "binary_accuracy"

    def label_map(self, train: "Examples", delimiter: str) -> "LabelMap":
        from tfsft.data import LabelMap, _parses_as
        from tfsft.errors import DataError

        names = {name for label, row in zip(train.labels, train.rows) for name in label_set(label, delimiter, train.source, row)}
        if len(names) < 2:
            raise DataError(f"{train.source}: only {sorted(names)} as labels in the training data; multilabel needs at least two")
        return LabelMap(tuple(sorted(names, key=int) if all(_parses_as(n, int) for n in names) else sorted(names)))

    def encode_labels(self, label_map: "LabelMap", examples: "Examples", delimiter: str) -> np.ndarray:
        return encode_label_sets(label_map, examples, delimiter)

    def objective(self) -> tuple[Any, list]:
        from tfsft.modeling import tf

        # One independent sigmoid per label; a logit of 0 is probability 0.5.
        return (
            tf.keras.losses.BinaryCrossentropy(from_logits=True),
            [tf.keras.metrics.BinaryAccuracy(name="binary_accuracy", threshold=0.0)],
        )

    def metrics(self, reference, logits, label_map, prefix, decision):
        return multilabel_metrics(reference, logits, label_map, prefix, decision.get("threshold"))

    def agreement(self, candidate, reference, tolerance, threshold, token_labels, lengths) -> tuple[Optional[float], int]:
        """The prediction is the set of labels at or over the threshold: decided when every logit is
        more than `tolerance` from the threshold's logit."""
        cut = threshold_logit(threshold)
        decided = (np.abs(reference - cut) > tolerance).all(axis=-1)
        agrees = ((candidate >= cut) == (reference >= cut)).all(axis=-1)
        count = int(decided.sum())
        return (float(agrees[decided].mean()) if count else None), count

    def decode(self, logits: np.ndarray, bundle: Any) -> list[LabelSet]:
        """Labels whose sigmoid probability reaches the threshold chosen on validation (bundle.json)."""
        threshold = float((bundle.metadata.get("decision") or {}).get("threshold", DEFAULT_MULTILABEL_THRESHOLD))
        probabilities = sigmoid(logits)
        return [
            LabelSet(
                labels=[label for label, p in zip(bundle.labels, row) if p >= threshold],
                probabilities={label: float(p) for label, p in zip(bundle.labels, row)},
            )
            for row in probabilities
        ]

    def csv_columns(self, labels: Sequence[str]) -> list[str]:
        return ["labels", *(f"p_{label}" for label in labels)]

    def distill_hard_width(self, outputs: int) -> int:
        return outputs

    def distill_losses(self, hard, teacher, y_pred, temperature):
        from tfsft.modeling import tf

        hard_loss = tf.keras.losses.binary_crossentropy(tf.cast(hard, y_pred.dtype), y_pred, from_logits=True)
        if teacher is None:
            return hard_loss, None
        t = float(temperature)
        return hard_loss, tf.keras.losses.binary_crossentropy(tf.sigmoid(teacher / t), y_pred / t, from_logits=True) * t * t

    def distill_metric(self, hard, y_pred):
        from tfsft.modeling import tf

        return tf.keras.metrics.binary_accuracy(hard, tf.cast(y_pred, tf.float32), threshold=0.0)

    def teacher_labels(self, teacher: np.ndarray, threshold: float) -> np.ndarray:
        return (teacher >= np.log(threshold / (1 - threshold))).astype(np.float32)


TASK = Multilabel()
