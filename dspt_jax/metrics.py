"""Classification metrics (host-side numpy) and the run's metric writer (JSON lines + TensorBoard)."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import time

import numpy as np

from dspt_jax import files

log = logging.getLogger(__name__)


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


def read_records(path: str) -> tuple[list[dict], int]:
    """The complete records of a `metrics.jsonl` and how many lines were left out.

    A line counts only when it ends with a newline and parses as a JSON object with a `step`: a process
    killed in the middle of an append leaves a partial last line, which is never read as a record.
    """
    lines = files.read_bytes(path).split(b"\n")
    dropped = 1 if lines[-1].strip() else 0  # the text after the last newline: an append cut short
    records = []
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError included: damaged bytes
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            dropped += 1
    return records, dropped


def _write_lines_atomically(path: str, records: list[dict]) -> None:
    """Replaces `path` with `records`, one JSON line each, atomically: a kill leaves the old file or the new
    one, never a truncated one."""
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def _fields(record: dict) -> frozenset:
    """What a record measures: its names, without the step and the wall-clock time."""
    return frozenset(record) - {"step", "time"}


def _summary_writer_class():
    """tensorboardX's SummaryWriter, or None without tensorboardX.

    tensorboardX imports torch whenever it is installed, only to accept torch tensors; the writer logs floats.
    That import costs seconds of every run's start-up (and of every restart after a preemption), so torch is
    kept out of it unless something imported torch already.
    """
    keep_out = "torch" not in sys.modules
    if keep_out:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this entry stands
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    finally:
        if keep_out and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]  # torch imports normally again
    return SummaryWriter


# The client library tensorboardX needs to write events to a bucket of each scheme.
_TENSORBOARD_CLIENTS = {"gs": "google.cloud.storage", "s3": "boto3"}


def _tensorboard_writer(workdir: str, purge_step: int | None):
    """tensorboardX's writer into <workdir>/tensorboard; None without tensorboardX or, for a bucket, without
    the client library tensorboardX writes to it with (JSON lines are the record, TensorBoard a convenience)."""
    SummaryWriter = _summary_writer_class()
    if SummaryWriter is None:
        return None
    if files.is_remote(workdir):
        scheme = str(workdir).split("://", 1)[0]
        client = _TENSORBOARD_CLIENTS.get(scheme)
        missing = f"tensorboardX cannot write to {scheme}:// paths"
        if client is not None:
            try:
                importlib.import_module(client)
                missing = None
            except ImportError:
                missing = f"writing there needs {client}: pip install {client.replace('.', '-')}"
        if missing:
            log.warning("No TensorBoard events in %s (%s); metrics.jsonl holds every record.", workdir, missing)
            return None
    return SummaryWriter(files.join(workdir, "tensorboard"), purge_step=purge_step)


class MetricWriter:
    """One JSON line per logged step in `metrics.jsonl`, and TensorBoard scalars (via tensorboardX).

    On a file system the file is append-only while a run goes on; in a bucket (`gs://`), which cannot
    append, it is rewritten whole (atomically) at each record. A run resumed from the checkpoint of step
    `resume_step` (after Ctrl-C, preemption or a SIGKILL at any moment) first trims it to what an uninterrupted run had
    written when it saved that checkpoint, so that the finished file holds the same records (times aside)
    as a run that was never stopped:
      * a partial last line (a kill in the middle of an append) is dropped;
      * records after `resume_step` are dropped: the resumed run logs those steps again;
      * records at `resume_step` are kept (the step's training line was written before its checkpoint and
        is not logged again), and a record that the resumed run makes again at that step (the same fields:
        an epoch's evaluation or selection, done after the checkpoint) is not written a second time.
    `records`: the records kept from before the resume, oldest first (empty for a fresh run).
    """

    def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
        """`enabled`: False writes nothing (hosts other than the first); `resume_step`: the step the run
        resumes from (0 for a fresh start)."""
        self._enabled = enabled
        self._tb = None
        self.records: list[dict] = []
        self._resume_step = int(resume_step)
        self._at_resume: list[frozenset] = []  # fields of the kept records at resume_step, not yet redone
        if not enabled:
            return
        files.makedirs(workdir)
        self._path = files.join(workdir, "metrics.jsonl")
        existed = files.exists(self._path)
        if existed:
            records, dropped = read_records(self._path)
            self.records = [r for r in records if r["step"] <= self._resume_step]
            if dropped or len(self.records) != len(records):
                _write_lines_atomically(self._path, self.records)
            self._at_resume = [_fields(r) for r in self.records if r["step"] == self._resume_step]
        # A bucket cannot append: there every record rewrites the file whole, from `_written`.
        self._jsonl = None if files.is_remote(self._path) else open(self._path, "a")
        self._written = list(self.records)
        # On resume, TensorBoard hides the older event files' points after the checkpoint's step (the resumed
        # run logs them again). Events still in tensorboardX's buffer when a run is killed are lost:
        # metrics.jsonl is the record, TensorBoard a view of it.
        self._tb = _tensorboard_writer(workdir, purge_step=self._resume_step + 1 if existed else None)

    def write(self, step: int, scalars: dict) -> None:
        """Appends one record of `scalars` (None values left out) at `step`, and flushes it."""
        if not self._enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        record = {"step": int(step), "time": time.time(), **scalars}
        if record["step"] == self._resume_step and _fields(record) in self._at_resume:
            # Made before the interruption, after the checkpoint: the file has it already.
            self._at_resume.remove(_fields(record))
        elif self._jsonl is None:
            self._written.append(record)
            _write_lines_atomically(self._path, self._written)
        else:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, int(step))

    def close(self) -> None:
        if self._enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
