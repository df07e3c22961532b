"""Training methods (`config.method`): NLPrompt end to end, its loss by hand, exact resume of its per-epoch
selection, and the refusal of unknown methods."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from dspt_jax import methods, train
from dspt_jax.methods import nlprompt
from test_train import read_jsonl, smoke_config


def test_nlprompt_loss_is_ce_on_the_kept_examples_and_mae_on_the_rest():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-3.0, 4.0, 0.0]])
    labels = jnp.asarray([0, 2, 1])
    kept = jnp.asarray([True, False, True])
    got = np.asarray(nlprompt.loss(logits, labels, {"ot_clean": kept}))
    p = np.exp(np.asarray(logits, np.float64))
    p /= p.sum(-1, keepdims=True)
    py = p[np.arange(3), np.asarray(labels)]
    np.testing.assert_allclose(got, [-np.log(py[0]), 1 - py[1], -np.log(py[2])], rtol=1e-6)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="config.method must be one of"):
        train.validate_config(smoke_config(method="promptmix"))
    coop = methods.get_method(smoke_config(loss="gce", gce_q=0.7))
    assert coop.key == ("coop", "gce", 0.7) and coop.select is None


NLPROMPT = {"method": "nlprompt", "num_epochs": 3, "noise.rate": 0.5, "log_every_steps": 1,
            "checkpoint_every_steps": 100000}


@pytest.fixture(scope="module")
def nlprompt_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("nlprompt") / "straight")
    return workdir, train.train_and_evaluate(smoke_config(**NLPROMPT), workdir)


def test_nlprompt_runs_end_to_end(nlprompt_run):
    workdir, results = nlprompt_run
    assert results["method"] == "nlprompt" and results["loss"] == "nlprompt"
    selections = results["selections"]
    assert [s["epoch"] for s in selections] == [1, 2, 3]
    flipped = 32 // 2  # toy: 32 training examples, half of them flipped (sym, rate 0.5)
    for s in selections:
        assert s["examples"] == 32 and 0 <= s["selected"] <= 32
        assert s["precision"] is None or 0 <= s["precision"] <= 1
        assert 0 <= s["recall"] <= 1
    assert sorted(os.listdir(os.path.join(workdir, "method"))) == [f"epoch_{e:04d}.npz" for e in range(3)]
    saved = np.load(os.path.join(workdir, "method", "epoch_0000.npz"))
    assert saved["ot_clean"].shape == (32,) and saved["ot_clean"].sum() == selections[0]["selected"]
    # The selection's precision and recall, by hand from the saved mask and the task's labels.
    lines = [l for l in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "selection_selected" in l]
    assert [l["selection_selected"] for l in lines] == [s["selected"] for s in selections]
    assert results["train"]["num_flipped"] == flipped


def test_nlprompt_resumes_exactly_in_the_middle_of_an_epoch(nlprompt_run, tmp_path):
    """Stopped at step 6 (epoch 2 of 4-step epochs) and resumed: the same selections and final prompt as
    the straight run. Epoch 2's selection is read back, not recomputed from the step-6 prompt."""
    straight, results = nlprompt_run
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(smoke_config(**NLPROMPT, max_steps=6), workdir)
    assert first["steps"] == 6 and len(first["selections"]) == 2
    again = train.train_and_evaluate(smoke_config(**NLPROMPT), workdir)
    assert again["selections"] == results["selections"]
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"], np.load(os.path.join(straight, "prompt.npz"))["ctx"],
        rtol=1e-6, atol=1e-7,
    )
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["final"] == results["final"]


def test_the_sweeps_third_axis_takes_methods():
    from dspt_jax import sweep

    assert sweep.objectives(["ce", "dspt"], ["coop", "nlprompt"]) == ["ce", "dspt", "nlprompt"]
    assert sweep.objectives(["ce"], ["nlprompt"]) == ["nlprompt"]
    with pytest.raises(ValueError, match="--methods"):
        sweep.objectives(["ce"], ["coop", "joint"])
    point = sweep.make_grid(["sym"], [0.5], ["nlprompt"], [1])[0]
    config = sweep.point_config(smoke_config(loss="gce"), point)
    assert (point.method, point.name, config.method, config.loss) == (
        "nlprompt", os.path.join("sym_r0.500", "nlprompt", "seed1"), "nlprompt", "gce")
    assert sweep.point_config(smoke_config(method="nlprompt"), sweep.make_grid(["sym"], [0.5], ["ce"], [1])[0]
                              ).method == "coop"


def test_a_vectorized_sweep_of_losses_and_methods(tmp_path):
    """CE and NLPrompt in one vectorized sweep: trained in two programs (runs trained together share a
    method), each point with its own results; the table has a row per method."""
    from dspt_jax import sweep

    base = smoke_config(num_epochs=1, log_every_steps=4)
    report = sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], sweep.objectives(["ce"], ["coop", "nlprompt"]),
                             [1, 2], vectorize=True)
    assert report.ok and len(report.ran) == 4
    for name in ("ce", "nlprompt"):
        with open(tmp_path / "sym_r0.500" / name / "seed1" / "results.json") as f:
            results = json.load(f)
        assert results["method"] == ("coop" if name == "ce" else "nlprompt") and results["runs_together"] == 2
    table = (tmp_path / "results_table.md").read_text()
    assert "NLPrompt" in table and "CoOp (CE)" in table


# ---------------------------------------------------------------------------------------------------------
# JoAPR (dspt_jax/methods/joapr.py): its step objective and per-epoch selection by hand, end to end, resume.


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_joapr_batch_permutation_pairs_real_rows_and_keeps_padding_in_place():
    from dspt_jax.methods import joapr

    u = np.asarray([0.7, 0.1, 0.9, 0.5, 0.3, 0.2], np.float32)
    mask = np.asarray([1, 1, 0, 1, 1, 0], bool)
    perm = np.asarray(joapr.batch_permutation(u, mask))
    # Real rows 0, 1, 3, 4 in batch order; by u: 1 (0.1), 4 (0.3), 3 (0.5), 0 (0.7). Padding 2 and 5 stay.
    np.testing.assert_array_equal(perm, [1, 4, 2, 3, 0, 5])


def test_joapr_objective_by_hand():
    """The warm-up loss on warm-up batches; after warm-up, refined targets for clean rows, sharpened
    predictions for noisy ones, one mixup, soft CE + alpha2 * KL(uniform || mean prediction), all in float64."""
    from dspt_jax.methods import joapr

    s = joapr.settings(smoke_config(method="joapr", **{"joapr.alpha1": 0.3, "joapr.alpha2": 0.7,
                                                       "joapr.temperature": 2.0}))
    rng = np.random.default_rng(0)
    b, d, k = 5, 3, 4
    x = rng.normal(size=(b, d)).astype(np.float32)
    w_mat = rng.normal(size=(d, k)).astype(np.float32)
    labels = np.asarray([0, 3, 1, 2, 0])
    mask = np.asarray([1, 1, 1, 1, 0], bool)
    batch = {"mask": mask, "joapr_clean": np.asarray([1, 0, 1, 0, 0], bool),
             "joapr_weight": np.asarray([0.8, 0, 0.3, 0, 0], np.float32),
             "mix_u": np.asarray([0.4, 0.2, 0.9, 0.1, 0.5], np.float32),
             "mix_lam": np.asarray([0.75, 0.6, 0.6, 0.6, 0.6], np.float32)}
    fn = joapr.objective(s)
    logits_of = lambda f: f @ w_mat  # noqa: E731
    for warm in (True, False):
        got, logits = fn(logits_of, jnp.asarray(x), jnp.asarray(labels),
                         {**{n: jnp.asarray(v) for n, v in batch.items()}, "joapr_warmup": jnp.full(b, warm)})
        z = x.astype(np.float64) @ w_mat
        p = _softmax64(z)
        np.testing.assert_allclose(np.asarray(logits), z, rtol=1e-5)
        if warm:
            want = -np.log(p[np.arange(b), labels]) + 0.3 * np.sum(p * np.log(p), -1)
        else:
            onehot = np.eye(k)[labels]
            w = batch["joapr_weight"][:, None].astype(np.float64)
            sharp = lambda q: q ** 2 / (q ** 2).sum(-1, keepdims=True)  # noqa: E731
            t = np.where(batch["joapr_clean"][:, None], sharp(w * onehot + (1 - w) * p), sharp(p))
            perm = [3, 1, 0, 2, 4]  # real rows 0..3 in order <- rows by u: 3 (0.1), 1 (0.2), 0 (0.4), 2 (0.9)
            lam = 0.75
            mx, mt = lam * x + (1 - lam) * x[perm], lam * t + (1 - lam) * t[perm]
            pm = _softmax64(mx.astype(np.float64) @ w_mat)
            pbar = pm[mask].mean(0)
            penalty = np.sum((1 / k) * np.log((1 / k) / pbar))
            want = -np.sum(mt * np.log(pm), -1) + 0.7 * penalty
        np.testing.assert_allclose(np.asarray(got)[mask], want[mask], rtol=2e-5, atol=1e-6)


def _joapr_select(epoch, probs, noisy, clean, saved, **overrides):
    from dspt_jax.methods import joapr

    s = joapr.settings(smoke_config(method="joapr", **{f"joapr.{k}": v for k, v in overrides.items()}))
    context = methods.SelectContext(epoch=epoch, seed=1, previous=lambda e: saved.get(e))
    return joapr.select(s, probs, noisy, clean, context)


def test_joapr_selection_by_hand():
    """Warm-up epochs select nothing; the first epoch after warm-up fits the mixture to this epoch's
    normalized CE + entropy and weights the labels by the clean probability; later epochs average the
    window's normalized losses, carry the noise-rate threshold over and weight by clean prob x p(label)."""
    from dspt_jax.methods import joapr_core as core

    rng = np.random.default_rng(3)
    m, k = 40, 5
    clean = rng.integers(0, k, m)
    noisy = clean.copy()
    noisy[:12] = (noisy[:12] + 1) % k
    saved = {}
    for epoch in range(4):
        logits = rng.normal(size=(m, k)) + 3.0 * np.eye(k)[clean] * (epoch + 1) / 2
        probs = _softmax64(logits)
        columns, stats = _joapr_select(epoch, probs, noisy, clean, saved, warmup_epochs=1, loss_window=2)
        assert columns["mix_u"].shape == columns["mix_lam"].shape == (m,)
        assert (columns["mix_lam"] >= 0.5).all() and (columns["mix_lam"] <= 1).all()
        if epoch == 0:
            assert stats == {"warmup": 1, "examples": m} and columns["joapr_warmup"].all()
            assert not columns["joapr_clean"].any()
        else:
            loss = -np.log(probs[np.arange(m), noisy]) - np.sum(probs * np.log(probs), -1)
            norm = (loss - loss.min()) / (loss.max() - loss.min())
            np.testing.assert_allclose(columns["joapr_norm_loss"], norm, rtol=1e-6)
            window = [saved[e][0]["joapr_norm_loss"] for e in range(max(1, epoch - 1), epoch)] + [norm]
            prev = 0.5 if epoch == 1 else saved[epoch - 1][1]["prob_threshold"]
            part = core.partition(np.mean(window, axis=0), prev)
            np.testing.assert_array_equal(columns["joapr_clean"], part.clean)
            w = part.clean_prob * (1.0 if epoch == 1 else probs[np.arange(m), noisy])
            np.testing.assert_allclose(columns["joapr_weight"], np.where(part.clean, w, 0), rtol=1e-5)
            assert stats["prob_threshold"] == part.prob_threshold and stats["selected"] == part.clean.sum()
            right = noisy == clean
            assert stats["precision"] == (part.clean & right).sum() / part.clean.sum()
            assert stats["recall"] == (part.clean & right).sum() / right.sum()
            assert not columns["joapr_warmup"].any()
        saved[epoch] = (columns, stats)
    # The draws depend on (seed, epoch) only: the same epoch draws the same numbers again.
    again, _ = _joapr_select(3, probs, noisy, clean, saved, warmup_epochs=1, loss_window=2)
    np.testing.assert_array_equal(again["mix_u"], saved[3][0]["mix_u"])


def test_joapr_readme_settings_and_bad_settings():
    from dspt_jax.methods import joapr

    config = smoke_config(method="joapr", **{"joapr.readme_settings": True, "noise.kind": "symflip",
                                             "noise.rate": 0.0, "noise.num_flips": 6, "data.shots": 16,
                                             "data.name": "oxford_flowers"})
    s = joapr.settings(config)
    assert (s["warmup_epochs"], s["alpha1"], s["alpha2"]) == (20, 0.5, 1.0)  # README: flowers, symflip 37.5%
    with pytest.raises(ValueError, match="symflip or pairflip"):
        joapr.settings(smoke_config(method="joapr", **{"joapr.readme_settings": True, "noise.kind": "sym"}))
    with pytest.raises(ValueError, match="config.joapr.loss_rule"):
        train.validate_config(smoke_config(method="joapr", **{"joapr.loss_rule": "median"}))


JOAPR = {"method": "joapr", "num_epochs": 3, "noise.rate": 0.5, "log_every_steps": 1,
         "checkpoint_every_steps": 100000, "joapr.warmup_epochs": 1}


@pytest.fixture(scope="module")
def joapr_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("joapr") / "straight")
    return workdir, train.train_and_evaluate(smoke_config(**JOAPR), workdir)


def test_joapr_runs_end_to_end(joapr_run):
    workdir, results = joapr_run
    assert results["method"] == "joapr" and results["loss"] == "joapr"
    selections = results["selections"]
    assert [s["epoch"] for s in selections] == [1, 2, 3] and selections[0]["warmup"] == 1
    for s in selections[1:]:
        assert s["examples"] == 32 and 0 < s["selected"] <= 32 and 0 <= s["recall"] <= 1
        assert 0 <= s["prob_threshold"] <= 1
    lines = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert all(np.isfinite(l["loss"]) for l in lines if "loss" in l)


def test_joapr_resumes_exactly_in_the_middle_of_an_epoch(joapr_run, tmp_path):
    """Stopped in epoch 3 (after warm-up; its selection depends on epoch 2's saved losses and threshold) and
    resumed: the same selections, mixup draws and final prompt as the straight run."""
    straight, results = joapr_run
    workdir = str(tmp_path / "resumed")
    first = train.train_and_evaluate(smoke_config(**JOAPR, max_steps=10), workdir)
    assert first["steps"] == 10 and len(first["selections"]) == 3
    again = train.train_and_evaluate(smoke_config(**JOAPR), workdir)
    assert again["selections"] == results["selections"]
    np.testing.assert_allclose(
        np.load(os.path.join(workdir, "prompt.npz"))["ctx"], np.load(os.path.join(straight, "prompt.npz"))["ctx"],
        rtol=1e-6, atol=1e-7,
    )


# ---------------------------------------------------------------------------------------------------------
# ELR (dspt_jax/methods/elr.py): its loss against a float64 closed form, its memory, a toy task, resume.


def test_elr_loss_value_and_gradient_against_float64_closed_form():
    import jax

    from dspt_jax.methods import elr

    rng = np.random.default_rng(1)
    z = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, 6)
    t = _softmax64(rng.normal(size=(6, 4))) * 0.8  # a memory after a few updates (sums to < 1)
    lam = 3.0
    p = _softmax64(z)
    tp = np.sum(t * p, -1)
    want = -np.log(p[np.arange(6), labels]) + lam * np.log(1 - tp)
    # d/dz of CE is p - y; of log(1 - <t, p>) it is -p * (t - <t, p>) / (1 - <t, p>) (no clamp active here).
    want_grad = p - np.eye(4)[labels] - lam * p * (t - tp[:, None]) / (1 - tp[:, None])
    got = elr.elr_loss(jnp.asarray(z, jnp.float32), jnp.asarray(labels), jnp.asarray(t, jnp.float32), lam)
    grad = jax.grad(lambda z: elr.elr_loss(z, jnp.asarray(labels), jnp.asarray(t, jnp.float32), lam).sum())(
        jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-5)


def test_elr_memory_is_a_temporal_ensemble_of_clamped_predictions():
    from dspt_jax.methods import elr

    m = elr.method(smoke_config(method="elr").elr)
    probs = [np.asarray([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]]), np.asarray([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])]
    saved = {}
    want = np.zeros((2, 3))
    for epoch, p in enumerate(probs):
        context = methods.SelectContext(epoch=epoch, seed=1, previous=lambda e: saved.get(e))
        columns, stats = m.select(p, np.asarray([0, 2]), np.asarray([0, 1]), context)
        q = np.clip(p, 1e-4, 1 - 1e-4)
        want = 0.7 * want + 0.3 * q / q.sum(-1, keepdims=True)
        np.testing.assert_allclose(columns["elr_target"], want, rtol=1e-6)
        saved[epoch] = (columns, stats)
    # Memory argmax after two epochs: class 0 (0.24 vs 0.18, 0.09) and class 1 (0.195 vs 0.132, 0.183); the
    # labels are 0 and 2, the clean labels 0 and 1.
    assert stats == {"target_agrees_with_label": 0.5, "target_accuracy": 1.0}


ELR = {"method": "elr", "num_epochs": 3, "noise.rate": 0.5, "log_every_steps": 1, "checkpoint_every_steps": 100000}


def test_elr_runs_and_resumes_exactly(tmp_path):
    straight = train.train_and_evaluate(smoke_config(**ELR), str(tmp_path / "straight"))
    assert straight["method"] == "elr" and [s["epoch"] for s in straight["selections"]] == [1, 2, 3]
    workdir = str(tmp_path / "resumed")
    assert train.train_and_evaluate(smoke_config(**ELR, max_steps=10), workdir)["steps"] == 10
    again = train.train_and_evaluate(smoke_config(**ELR), workdir)
    assert again["selections"] == straight["selections"] and again["final"] == straight["final"]
    np.testing.assert_allclose(np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
                               np.load(str(tmp_path / "straight" / "prompt.npz"))["ctx"], rtol=1e-6, atol=1e-7)


def test_elr_learns_a_separable_problem(tmp_path):
    """As tests/test_train.py's every-loss test: clean labels, class-specific context, loss and train
    accuracy must move."""
    config = smoke_config(method="elr", **{"noise.kind": "none", "noise.rate": 0.0, "prompt.csc": True,
                                           "data.shots": 16, "data.augment": False, "batch_size": 16,
                                           "num_epochs": 8, "optim.lr": 0.05, "log_every_steps": 4,
                                           "zero_shot": False})
    results = train.train_and_evaluate(config, str(tmp_path))
    lines = [l for l in read_jsonl(os.path.join(tmp_path, "metrics.jsonl")) if "loss" in l]
    first, last = lines[0], lines[-1]
    assert last["loss"] < first["loss"] - 0.01 and last["train_accuracy"] > first["train_accuracy"] + 0.2
    assert results["train"]["accuracy_clean_labels"] > 0.5  # chance is 0.25
