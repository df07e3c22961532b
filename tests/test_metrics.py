"""Macro-F1 as Dassl computes it: sklearn's f1_score(y_true, y_pred, average="macro",
labels=np.unique(y_true)) (KaiyangZhou/Dassl.pytorch, dassl/evaluation/evaluator.py, Classification).

The expected values are fractions worked out by hand from the confusion matrix; per class
F1 = 2 tp / (#predicted + #true), averaged over the classes that occur in the TRUE labels only.

MetricWriter: metrics.jsonl stays what an uninterrupted run writes across kills and resumes (end of file).
"""

import os

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


# ---------------------------------------------------------------------------------------------------------
# MetricWriter: metrics.jsonl across interruptions (a kill at any moment, then a resume from a checkpoint).


def _jsonl(workdir):
    """The records of `workdir`/metrics.jsonl without their wall-clock times."""
    records, dropped = metrics.read_records(os.path.join(workdir, "metrics.jsonl"))
    assert dropped == 0
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def _trainer_events(steps=12, steps_per_epoch=4, checkpoint_every=2):
    """What the trainer does, in its order: per step a training line, then (every `checkpoint_every` steps)
    a checkpoint, then at epoch ends an evaluation line, and at epoch starts the next epoch's selection.
    Each event: (step, fields) for a metrics line, or (step, None) for a checkpoint."""
    events = [(0, ("selection_size",))]
    for step in range(1, steps + 1):
        events.append((step, ("loss", "lr")))
        if step % checkpoint_every == 0:
            events.append((step, None))
        if step % steps_per_epoch == 0 and step < steps:
            events.append((step, ("test_accuracy",)))
            events.append((step, ("selection_size",)))
    return events


def _play(writer, events):
    for step, fields in events:
        if fields is not None:
            writer.write(step, {name: step * 10 + i for i, name in enumerate(fields)})


def _resume_events(events, cut):
    """(resume step, what the resumed run does) after a kill once `events[:cut]` had happened: it resumes from
    the last checkpoint before the cut (or step 0), redoes what came after that checkpoint at its step (the
    evaluation and selection, which the trainer makes after saving), then goes on."""
    marks = [i for i, (_, fields) in enumerate(events[:cut]) if fields is None]
    if not marks:
        return 0, events
    step = events[marks[-1]][0]
    return step, [e for i, e in enumerate(events) if i > marks[-1] and e[0] >= step]


@pytest.mark.parametrize("partial", [False, True])
def test_a_run_killed_anywhere_and_resumed_logs_what_an_uninterrupted_one_does(tmp_path, partial):
    events = _trainer_events()
    straight = str(tmp_path / "straight")
    writer = metrics.MetricWriter(straight)
    _play(writer, events)
    writer.close()
    want = _jsonl(straight)
    for cut in range(len(events) + 1):
        workdir = str(tmp_path / f"cut{cut}")
        writer = metrics.MetricWriter(workdir)
        _play(writer, events[:cut])
        writer.close()
        if partial:  # killed in the middle of the next append
            with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
                f.write('{"step": 99, "loss": 1.2')
        resume_step, rest = _resume_events(events, cut)
        writer = metrics.MetricWriter(workdir, resume_step=resume_step)
        _play(writer, rest)
        writer.close()
        assert _jsonl(workdir) == want, (cut, resume_step)


def test_records_kept_on_resume_are_exposed(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"loss": step, "test_accuracy": None})
    writer.close()
    resumed = metrics.MetricWriter(str(tmp_path), resume_step=2)
    assert [(r["step"], r["loss"]) for r in resumed.records] == [(1, 1.0), (2, 2.0)]
    assert all("test_accuracy" not in r for r in resumed.records)  # None values are left out
    resumed.close()
    assert metrics.MetricWriter(str(tmp_path / "fresh")).records == []


def test_damaged_lines_are_left_out_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 1.0}\n\xff\xfe\n[1, 2]\n{"loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"st')
    records, dropped = metrics.read_records(str(path))
    assert [r["step"] for r in records] == [1, 2] and dropped == 4
    metrics.MetricWriter(str(tmp_path), resume_step=5).close()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'


def test_a_kill_while_trimming_leaves_the_old_file(tmp_path, monkeypatch):
    """The trim on resume replaces the file in one rename: cut short before it, the records are all there."""
    path = tmp_path / "metrics.jsonl"
    before = '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "loss": 3.0}\n{"st'
    path.write_text(before)

    def killed(*args):
        raise KeyboardInterrupt  # stands for the process dying here

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricWriter(str(tmp_path), resume_step=1)
    assert path.read_text() == before
    monkeypatch.undo()
    metrics.MetricWriter(str(tmp_path), resume_step=1).close()
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_finished_file_is_left_alone(tmp_path):
    """Resuming at the last step (a run killed after training, during its final evaluation) rewrites nothing."""
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2):
        writer.write(step, {"loss": step})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    before, mtime = path.read_text(), os.stat(path).st_mtime_ns
    metrics.MetricWriter(str(tmp_path), resume_step=2).close()
    assert path.read_text() == before and os.stat(path).st_mtime_ns == mtime
