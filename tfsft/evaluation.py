"""Predict with a Keras model and score it per task (scikit-learn, scipy): metrics, report, plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tfsft.artifacts import CONFUSION_PLOT, write_json
from tfsft.config import DataConfig
from tfsft.data import IGNORED_LABEL, LabelMap, LengthBatchedData
from tfsft.modeling import tf


def predict_logits(model, data: LengthBatchedData) -> np.ndarray:
    """Logits for every example of `data`, in the examples' original order."""

    @tf.function(reduce_retracing=True)
    def forward(features):
        return tf.cast(model(features, training=False).logits, tf.float32)

    chunks = [forward(features).numpy() for features in _features_only(data)]
    logits = concat_padded(chunks)
    out = np.empty_like(logits)
    out[data.order()] = logits
    return out


def concat_padded(chunks: list[np.ndarray]) -> np.ndarray:
    """Concatenate batches; per-token logits [batch, width, labels] are zero-padded to the widest."""
    if chunks[0].ndim < 3:
        return np.concatenate(chunks)
    width = max(chunk.shape[1] for chunk in chunks)
    return np.concatenate([np.pad(c, ((0, 0), (0, width - c.shape[1]), (0, 0))) for c in chunks])


def _features_only(data: LengthBatchedData):
    for item in data:
        yield item[0] if isinstance(item, tuple) else item


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def classification_metrics(
    labels: np.ndarray, logits: np.ndarray, label_map: LabelMap, prefix: str = "eval"
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


def regression_metrics(
    targets: np.ndarray, logits: np.ndarray, label_map: LabelMap, prefix: str = "eval"
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


def token_tags(labels: np.ndarray, logits: np.ndarray, label_map: LabelMap) -> tuple[list[list[str]], list[list[str]]]:
    """(true, predicted) tag sequences over the labeled tokens (first word pieces) of each example."""
    true, predicted = [], []
    for values, scores in zip(labels, logits):
        keep = np.flatnonzero(np.asarray(values) != IGNORED_LABEL)
        true.append([label_map.names[i] for i in np.asarray(values)[keep]])
        predicted.append([label_map.names[i] for i in scores[keep].argmax(-1)])
    return true, predicted


def ner_metrics(
    labels: np.ndarray, logits: np.ndarray, label_map: LabelMap, prefix: str = "eval"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Entity-level precision, recall and F1 (seqeval, CoNLL rules), token accuracy and the
    masked cross-entropy. `labels`: per-token label arrays with IGNORED_LABEL where not scored."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    true, predicted = token_tags(labels, logits, label_map)
    losses, hits, count = 0.0, 0, 0
    for values, scores in zip(labels, logits):
        keep = np.flatnonzero(np.asarray(values) != IGNORED_LABEL)
        gold = np.asarray(values)[keep]
        log_probabilities = log_softmax(scores[keep].astype(np.float64))
        losses += float(-log_probabilities[np.arange(len(keep)), gold].sum())
        hits += int((scores[keep].argmax(-1) == gold).sum())
        count += len(keep)
    metrics = {
        f"{prefix}_loss": losses / max(count, 1),
        f"{prefix}_precision": float(precision_score(true, predicted, zero_division=0)),
        f"{prefix}_recall": float(recall_score(true, predicted, zero_division=0)),
        f"{prefix}_f1": float(f1_score(true, predicted, zero_division=0)),
        f"{prefix}_token_accuracy": hits / max(count, 1),
        f"{prefix}_samples": int(len(labels)),
    }
    report = {
        "labels": list(label_map.names),
        "entities": json_safe(classification_report(true, predicted, output_dict=True, zero_division=0)),
    }
    return metrics, report


def json_safe(report: dict[str, Any]) -> dict[str, Any]:
    return {key: {k: float(v) if k != "support" else int(v) for k, v in row.items()} for key, row in report.items()}


@dataclass(frozen=True)
class SpanReference:
    """What question-answering logits are scored against: the questions with their gold
    answers (`tfsft.qa.QAExamples`), their windows (`QAWindows`, in the logits' row order), and
    the run's decoding settings (n_best_size, max_answer_length, version_2_with_negative)."""

    examples: Any
    windows: Any
    settings: DataConfig


def span_reference(encoder: Any, examples: Any, settings: DataConfig) -> SpanReference:
    """Question-answering examples cut into their windows (`settings.doc_stride`), with what
    scores them: the windows' `encoded` and `positions` are the model's inputs and labels."""
    from tfsft.qa import make_windows

    return SpanReference(examples, make_windows(encoder, examples, settings.doc_stride), settings)


def span_loss(logits: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> float:
    """Mean over windows of the start and end cross-entropies, each over the window's own tokens."""
    total = 0.0
    for row, (start, end) in enumerate(np.asarray(positions)):
        own = np.asarray(logits[row, : lengths[row]], dtype=np.float64)
        log_probabilities = log_softmax(own.T)
        total += -(log_probabilities[0, start] + log_probabilities[1, end]) / 2.0
    return total / max(len(positions), 1)


def span_metrics(
    reference: SpanReference, logits: np.ndarray, label_map: LabelMap, prefix: str = "eval",
    null_threshold: Optional[float] = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """SQuAD exact match and F1 (official normalisation, as fractions) of the best span of each
    question over all its windows, and the windows' span loss.

    SQuAD v2 data (`version_2_with_negative`): a question gets "" when its null score beats its
    best span's by more than the null threshold. Without `null_threshold` the threshold with the
    best F1 on these questions is chosen (on validation only, as the official v2 script's best_f1
    does): it is the decision shipped (report["decision"]) and the test set's threshold, and the
    scores taken at it are in-sample. With it (the test set, a saved run) the scores are at it.
    """
    from tfsft import qa

    examples, windows, settings = reference.examples, reference.windows, reference.settings
    spans = qa.best_spans(
        logits, windows, examples, n_best=settings.n_best_size, max_answer_length=settings.max_answer_length
    )
    golds = examples.answer_texts()
    metrics: dict[str, Any] = {f"{prefix}_loss": span_loss(logits, windows.positions, windows.encoded.lengths)}
    report: dict[str, Any] = {}
    answered = spans
    if settings.version_2_with_negative:
        if null_threshold is None:
            _, null_threshold = qa.squad_v2_scores(spans, golds)
            selection = "tuned on these questions (in-sample): the threshold with the best F1"
        else:
            selection = "fixed before scoring (chosen on validation)"
        answered = [qa.apply_null_threshold(span, null_threshold) for span in spans]
        scores = _has_answer_scores([span.answer for span in answered], golds)
        metrics[f"{prefix}_null_threshold"] = float(null_threshold)
        report["decision"] = {"null_threshold": float(null_threshold)}
        report["threshold_selection"] = selection
    else:
        scores = qa.squad_scores([span.answer for span in answered], golds)
    metrics.update({f"{prefix}_{name}": float(value) for name, value in scores.items()})
    metrics[f"{prefix}_samples"] = len(examples)
    metrics[f"{prefix}_windows"] = len(windows)
    report["predictions"] = [
        {"id": example_id, **span.to_dict()} for example_id, span in zip(examples.ids, answered)
    ]
    return metrics, report


def _has_answer_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """SQuAD v2 scores: overall, and over the questions with and without an answer."""
    from tfsft import qa

    scores = qa.squad_scores(predictions, golds)
    for name, keep in (("has_ans", [bool(g) for g in golds]), ("no_ans", [not g for g in golds])):
        chosen = [i for i, k in enumerate(keep) if k]
        if chosen:
            part = qa.squad_scores([predictions[i] for i in chosen], [golds[i] for i in chosen])
            scores.update({f"{name}_{metric}": value for metric, value in part.items()})
    return scores


THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
"""Multilabel decision thresholds tried on validation (0.05 to 0.95)."""


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def best_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold of THRESHOLDS with the best micro F1 (the lowest one on ties)."""
    from sklearn.metrics import f1_score

    scores = [f1_score(labels, probabilities >= t, average="micro", zero_division=0) for t in THRESHOLDS]
    return THRESHOLDS[int(np.argmax(scores))]


CROSS_FIT_SEED = 0
"""Seed of the split of a validation set into the two halves that score each other's threshold."""


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
    labels: np.ndarray, logits: np.ndarray, label_map: LabelMap, prefix: str = "eval", threshold: Optional[float] = None
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


def _per_label(labels: np.ndarray, predicted: np.ndarray, label_map: LabelMap) -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, average=None, zero_division=0)
    return {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(label_map.names, precision, recall, f1, support)
    }


TASK_METRICS: dict[str, Callable[..., tuple[dict[str, float], dict[str, Any]]]] = {
    "classification": lambda labels, logits, label_map, prefix, decision: classification_metrics(labels, logits, label_map, prefix),
    "regression": lambda labels, logits, label_map, prefix, decision: regression_metrics(labels, logits, label_map, prefix),
    "multilabel": lambda labels, logits, label_map, prefix, decision: multilabel_metrics(
        labels, logits, label_map, prefix, decision.get("threshold")
    ),
    "ner": lambda labels, logits, label_map, prefix, decision: ner_metrics(labels, logits, label_map, prefix),
    "qa": lambda reference, logits, label_map, prefix, decision: span_metrics(
        reference, logits, label_map, prefix, decision.get("null_threshold")
    ),
}
"""Task -> f(labels, logits, label map, prefix, decision) -> (metrics, report). `decision` holds
settings fixed by the user or chosen on validation (multilabel: the threshold); a report's
"decision" is what the test set and the exported bundle must use."""
KERAS_SCORED_METRICS = {"classification": frozenset({"accuracy", "loss"})}
"""Best-epoch metrics Keras computes during `fit`, by task; any other is scored by TASK_METRICS
after each epoch (F1, MCC, correlations, thresholds and entity spans do not stream)."""


def keras_scores(task: str, metric: str) -> bool:
    """Whether Keras' own validation pass yields `val_<metric>` for this task."""
    return metric in KERAS_SCORED_METRICS.get(task, frozenset())


def task_metrics(
    task: str,
    labels: np.ndarray,
    logits: np.ndarray,
    label_map: LabelMap,
    prefix: str = "eval",
    decision: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    return TASK_METRICS[task](labels, logits, label_map, prefix, {k: v for k, v in (decision or {}).items() if v is not None})


def plot_confusion_matrix(matrix: list[list[int]], names: list[str], path: Path, title: str = "") -> Path:
    """Save the confusion matrix (rows: true label, columns: predicted) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    threshold = counts.max() / 2 if counts.size else 0
    for (row, col), value in np.ndenumerate(counts):
        ax.text(col, row, str(value), ha="center", va="center", color="white" if value > threshold else "black")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_evaluation(directory: Path, metrics: dict[str, float], report: dict[str, Any], name: str) -> None:
    """Write `<name>_report.json`, and its confusion-matrix PNG when it has one, into `directory`."""
    write_json(directory / f"{name}_report.json", report)
    if "confusion_matrix" not in report:
        return
    plot_name = CONFUSION_PLOT if name == "eval" else f"{name}_{CONFUSION_PLOT}"
    plot_confusion_matrix(report["confusion_matrix"], report["labels"], directory / plot_name, f"{name} confusion matrix")
