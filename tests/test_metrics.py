"""Macro-F1 as Dassl computes it: sklearn's f1_score(y_true, y_pred, average="macro",
labels=np.unique(y_true)) (KaiyangZhou/Dassl.pytorch, dassl/evaluation/evaluator.py, Classification).

The expected values are fractions worked out by hand from the confusion matrix; per class
F1 = 2 tp / (#predicted + #true), averaged over the classes that occur in the TRUE labels only.
"""

import numpy as np
import pytest

from dspt_jax import metrics


def _macro_f1(labels, preds, num_classes):
    return metrics.classification_metrics(np.array(labels), np.array(preds), num_classes)["macro_f1"]


def test_predicted_class_absent_from_labels_is_not_averaged():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 3, 1, 2, 3]  # class 3 is predicted twice but never a true label
    m = metrics.classification_metrics(np.array(labels), np.array(preds), num_classes=4)
    # class 0: tp=2, predicted 2, true 3 -> 2*2/(2+3) = 4/5
    # class 1: tp=1, predicted 1, true 2 -> 2*1/(1+2) = 2/3
    # class 2: tp=0 (its one example predicted as 3; one class-1 example predicted as 2) -> 0
    # class 3: not in the labels -> no term (averaging it in as 0 would give 22/60 = 11/30)
    # macro-F1 = (4/5 + 2/3 + 0) / 3 = (12/15 + 10/15) / 3 = 22/45
    assert m["macro_f1"] == pytest.approx(22 / 45)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["per_class_accuracy"] == [pytest.approx(2 / 3), 0.5, 0.0, None]


def test_absent_prediction_still_costs_the_true_class_recall():
    # class 1: tp=1, predicted 1, true 2 -> 2/3; class 0 (predicted once, never true) -> no term.
    # macro-F1 = 2/3 (averaging class 0 in as 0 would give 1/3)
    assert _macro_f1([1, 1], [1, 0], num_classes=2) == pytest.approx(2 / 3)


def test_present_class_never_predicted_scores_zero():
    labels = [0, 1, 2]
    preds = [0, 0, 3]
    # class 0: tp=1, predicted 2, true 1 -> 2/3
    # class 1: tp=0, predicted 0 (precision 0/0), true 1 -> 0 (sklearn's zero_division result)
    # class 2: tp=0, predicted 0, true 1 -> 0
    # class 3: predicted once, never true -> no term
    # macro-F1 = (2/3 + 0 + 0) / 3 = 2/9
    assert _macro_f1(labels, preds, num_classes=4) == pytest.approx(2 / 9)


def test_perfect_predictions_and_classes_absent_everywhere():
    # Classes 2..4 occur nowhere: no term, no penalty. Both classes F1 = 1.
    assert _macro_f1([0, 1, 1, 0], [0, 1, 1, 0], num_classes=5) == pytest.approx(1.0)


def test_same_value_when_predictions_stay_within_the_labels():
    # When every predicted class is also a true class, "present in labels" and "present in labels or
    # predictions" agree: class 0: 2*1/(2+2) = 1/2, class 1: 2*2/(3+2) = 4/5, class 2: 2*1/(1+2) = 2/3.
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    assert _macro_f1(labels, preds, num_classes=4) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def _reference_macro_f1(labels, preds):
    """Textbook per-class precision / recall / harmonic mean, zero_division=0, over np.unique(labels)."""
    scores = []
    for c in np.unique(labels):
        tp = np.sum((preds == c) & (labels == c))
        n_pred, n_true = np.sum(preds == c), np.sum(labels == c)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true
        scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return float(np.mean(scores))


def _random_cases(num_cases=50):
    rng = np.random.default_rng(0)
    for _ in range(num_cases):
        k = int(rng.integers(2, 12))
        n = int(rng.integers(1, 60))
        # Labels drawn from a subset of the classes, predictions from all of them: predictions of
        # classes absent from the labels are common.
        labels = rng.choice(rng.permutation(k)[: int(rng.integers(1, k + 1))], size=n)
        preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, k, size=n))
        yield labels, preds, k


def test_random_against_textbook_definition():
    for labels, preds, k in _random_cases():
        got = metrics.classification_metrics(labels, preds, k)["macro_f1"]
        assert got == pytest.approx(_reference_macro_f1(labels, preds), abs=1e-12)


def test_random_against_sklearn():
    """Dassl's exact call (scikit-learn is a test extra: the oracle, not a dependency)."""
    from sklearn import metrics as sklearn_metrics
    for labels, preds, k in _random_cases():
        want = sklearn_metrics.f1_score(
            labels, preds, average="macro", labels=np.unique(labels), zero_division=0
        )
        got = metrics.classification_metrics(labels, preds, k)["macro_f1"]
        assert got == pytest.approx(want, abs=1e-12)
