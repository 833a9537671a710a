"""Scoring: what the reported metrics promise, beyond the per-task values in test_tasks.py."""

from __future__ import annotations

import numpy as np
import pytest

from tfsft.data import LabelMap


def noise(n: int = 120, labels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits drawn independently: no threshold has any real skill on them."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, labels)) < 0.3).astype(np.int64), rng.normal(-0.8, 1.0, (n, labels))


def test_multilabel_scores_are_not_taken_at_a_threshold_tuned_on_the_scored_labels():
    """The shipped threshold is tuned on the whole validation set, but eval_f1_micro is
    cross-fitted: each half scored at the threshold tuned on the other half. On noise, the
    in-sample score (tuned and scored on the same labels) is the optimistic one."""
    from sklearn.metrics import f1_score

    from tfsft.tasks.multilabel import best_threshold, cross_fitted_predictions, multilabel_metrics, sigmoid

    labels, logits = noise()
    probabilities = sigmoid(logits)
    metrics, report = multilabel_metrics(labels, logits, LabelMap(("a", "b", "c")))
    shipped = best_threshold(labels, probabilities)
    assert metrics["eval_threshold"] == shipped and report["decision"] == {"threshold": shipped}
    in_sample = f1_score(labels, probabilities >= shipped, average="micro", zero_division=0)
    assert metrics["eval_f1_micro_in_sample"] == pytest.approx(in_sample)

    predicted, folds, thresholds = cross_fitted_predictions(labels, probabilities)
    assert sorted(np.bincount(folds).tolist()) == [60, 60]
    for fold in (0, 1):
        mine, other = folds == fold, folds != fold
        assert thresholds[fold] == best_threshold(labels[other], probabilities[other])
        np.testing.assert_array_equal(predicted[mine], probabilities[mine] >= thresholds[fold])
    assert metrics["eval_f1_micro"] == pytest.approx(f1_score(labels, predicted, average="micro", zero_division=0))
    assert metrics["eval_exact_match"] == pytest.approx((predicted == labels).all(axis=1).mean())
    assert metrics["eval_f1_micro"] < metrics["eval_f1_micro_in_sample"]
    selection = report["threshold_selection"]
    assert selection["fold_thresholds"] == list(thresholds) and "cross-fitted" in selection["scored"]


def test_a_fold_is_scored_without_its_own_labels():
    """Whatever the labels of one half say, that half's predictions do not move."""
    from tfsft.tasks.multilabel import cross_fitted_predictions, sigmoid

    labels, logits = noise(seed=1)
    probabilities = sigmoid(logits)
    predicted, folds, _ = cross_fitted_predictions(labels, probabilities)
    for fold in (0, 1):
        changed = labels.copy()
        changed[folds == fold] = 1 - changed[folds == fold]
        again, same_folds, _ = cross_fitted_predictions(changed, probabilities)
        np.testing.assert_array_equal(same_folds, folds)
        np.testing.assert_array_equal(again[folds == fold], predicted[folds == fold])


def test_a_given_multilabel_threshold_is_scored_as_is():
    """A fixed threshold (--multilabel_threshold, or validation's on the test set) is not tuned
    on the scored labels, so its scores are plain and there is no in-sample variant."""
    from sklearn.metrics import f1_score

    from tfsft.tasks.multilabel import multilabel_metrics, sigmoid

    labels, logits = noise(seed=2)
    metrics, report = multilabel_metrics(labels, logits, LabelMap(("a", "b", "c")), "test", threshold=0.3)
    assert metrics["test_threshold"] == 0.3 and report["decision"] == {"threshold": 0.3}
    assert metrics["test_f1_micro"] == pytest.approx(f1_score(labels, sigmoid(logits) >= 0.3, average="micro"))
    assert not any(key.endswith("_in_sample") for key in metrics)
