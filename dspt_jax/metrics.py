"""Classification metrics (host-side numpy) and the run's metric writer (JSON lines + TensorBoard)."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """[K, K] counts, rows = true label, columns = prediction."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(preds, np.int64)), 1)
    return cm


def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro-F1 and per-class accuracy (recall; None for a class absent from `labels`).

    Macro-F1 is Dassl's (``dassl/evaluation/evaluator.py``, ``Classification.evaluate``):
    ``f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))``, i.e. the mean per-class F1
    over the classes present in the TRUE labels only. A predicted class absent from the labels gets no
    F1 term of its own, but its predictions still cost the true class they came from recall. Per
    class, F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (#predicted + #true), which is 0 when tp = 0 (also
    when the class is never predicted, sklearn's zero_division result for that case).
    """
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.size == 0:
        raise ValueError("no examples to evaluate")
    cm = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
    present = support > 0  # = np.unique(labels): support + predicted > 0 there, so no 0/0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return {
        "accuracy": float(tp.sum() / labels.size),
        "macro_f1": float(f1.mean()),
        "per_class_accuracy": [None if np.isnan(r) else float(r) for r in recall],
        "num_examples": int(labels.size),
    }


def train_set_diagnostics(preds, noisy, clean, flipped) -> dict:
    """How the tuned prompt sees its own training set: clean-label accuracy and memorized noise.

    `fitted_flipped`: flipped examples predicted as their (wrong) training label, the memorization that
    DSPT is meant to prevent; `corrected_flipped`: flipped examples predicted as their true class.
    """
    preds, noisy, clean, flipped = map(np.asarray, (preds, noisy, clean, flipped))
    known = clean >= 0
    out = {
        "num_examples": int(preds.size),
        "accuracy_noisy_labels": float((preds == noisy).mean()),
        "accuracy_clean_labels": float((preds[known] == clean[known]).mean()) if known.any() else None,
        "num_flipped": int(flipped.sum()),
        "fitted_flipped": int((preds[flipped] == noisy[flipped]).sum()),
        "corrected_flipped": int((preds[flipped] == clean[flipped]).sum()),
    }
    out["fitted_flipped_fraction"] = (
        out["fitted_flipped"] / out["num_flipped"] if out["num_flipped"] else None
    )
    return out


class MetricWriter:
    """One JSON line per logged step in `metrics.jsonl`, and TensorBoard scalars (via tensorboardX)."""

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: a resumed run drops the lines logged after its checkpoint (they are redone)."""
        self._enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self._jsonl = open(path, "a")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional: JSON lines are the record, TensorBoard a convenience
            pass

    def write(self, step: int, scalars: dict) -> None:
        if not self._enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
