"""PromptOT (`dspt_jax.methods.ot`) against POT, the library NLPrompt's code calls (`ot.sinkhorn`)."""

import contextlib
import math
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspt_jax.methods import ot as promptot

# POT's numpy backend is all the tests use: skip importing its torch / TensorFlow / CuPy / JAX backends (seconds).
_NO_BACKENDS = [f"POT_BACKEND_DISABLE_{name}" for name in ("PYTORCH", "TENSORFLOW", "CUPY", "JAX")]
_set_here = [key for key in _NO_BACKENDS if key not in os.environ]
os.environ.update({key: "1" for key in _set_here})
try:
    import ot  # POT: the oracle (the `test` extra); a missing oracle fails the suite
finally:
    for key in _set_here:
        del os.environ[key]

NUM_ITERS, TOL = 1000, 1e-6  # the repo's numItermax and stopThr
ORACLE_ITERS = 400  # enough to converge at reg 0.05 (not at 0.001): POT in numpy is the slow part of this file
# POT warns when it stops at numItermax before stopThr (the repo's settings do at small reg), and numpy when
# POT's intermediate exp over- or underflows.
quiet_pot = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def x64():
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64()


def dirichlet_probs(n, k, seed, alpha=0.3):
    return np.random.default_rng(seed).dirichlet(np.full(k, alpha), size=n)


def uniform_marginals(n, k):
    return np.full(n, 1.0 / n), np.full(k, 1.0 / k)


def repo_selection(coupling, noisy, budget):
    """NLPrompt's utils.py on a POT coupling: row argmax, top int(N * budget) row maxima, clean mask."""
    n = coupling.shape[0]
    assigned = coupling.argmax(axis=1)
    selected = np.zeros(n, bool)
    selected[np.argsort(-coupling.max(axis=1), kind="stable")[: int(n * min(1.0, budget))]] = True
    return assigned, selected, selected & (assigned == noisy)


@quiet_pot
@pytest.mark.parametrize("n,k", [(50, 5), (200, 20)])
@pytest.mark.parametrize("cost", ["logP", "nll"])
@pytest.mark.parametrize("reg", [0.05, 0.01, 0.001])
def test_sinkhorn_log_equals_pot_log_method(n, k, cost, reg):
    probs = dirichlet_probs(n, k, seed=n + k)
    with x64():
        c = np.asarray(promptot.cost_matrix(jnp.asarray(probs), cost))
        assert c.dtype == np.float64
        a, b = uniform_marginals(n, k)
        ours, iters, _ = promptot.sinkhorn_log_info(c, a, b, reg, ORACLE_ITERS, TOL)
        assert ours.dtype == jnp.float64
    ref, log = ot.sinkhorn(a, b, c, reg, method="sinkhorn_log", numItermax=ORACLE_ITERS, stopThr=TOL, log=True)
    assert int(iters) == log["niter"] + 1  # the same stopping iteration, converged or not
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-9, atol=1e-12 * ref.max())


@quiet_pot
@pytest.mark.parametrize("n,k", [(50, 5), (200, 20)])
@pytest.mark.parametrize("cost", ["logP", "nll", "out"])
@pytest.mark.parametrize("reg", [0.05, 0.01])
def test_sinkhorn_log_equals_pot_default_method(n, k, cost, reg):
    """POT's plain Sinkhorn-Knopp (the repo's call) where its kernel does not underflow."""
    probs = dirichlet_probs(n, k, seed=7 * n + k)
    with x64():
        c = np.asarray(promptot.cost_matrix(jnp.asarray(probs), cost))
        a, b = uniform_marginals(n, k)
        ours = np.asarray(promptot.sinkhorn_log(c, a, b, reg, NUM_ITERS, TOL))
    ref = ot.sinkhorn(a, b, c, reg, numItermax=NUM_ITERS, stopThr=TOL)
    np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-12 * ref.max())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_pot_plain_sinkhorn_underflows_at_the_repos_small_reg():
    """The repo's call at reg_e = 0.001 (scripts/nlprompt/main.sh): exp(-C/reg) is 0 everywhere, POT returns the
    zero coupling (every row's argmax is class 0); the log-domain solver gives a proper coupling."""
    n, k = 50, 5
    probs = dirichlet_probs(n, k, seed=3)
    a, b = uniform_marginals(n, k)
    with x64():
        c = np.asarray(promptot.cost_matrix(jnp.asarray(probs), "logP"))
        ours = np.asarray(promptot.sinkhorn_log(c, a, b, 0.001, NUM_ITERS, TOL))
    with pytest.warns(UserWarning, match="numerical errors at iteration 0"):
        ref = ot.sinkhorn(a, b, c, 0.001, numItermax=NUM_ITERS, stopThr=TOL)
    assert not ref.any()
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours.sum(axis=1), a, rtol=1e-10)


@quiet_pot
@pytest.mark.parametrize("reg,budget", [(0.01, 1.0), (0.01, 0.5), (0.001, 1.0), (0.001, 0.3)])
def test_assignment_and_clean_mask_equal_the_repos_on_pots_coupling(reg, budget):
    """The repo's marginals (b = budget / K) in POT, its argmax / top-k / clean rule in numpy, against ours."""
    n, k = 200, 20
    probs = dirichlet_probs(n, k, seed=11)
    rng = np.random.default_rng(12)
    noisy = np.where(rng.random(n) < 0.4, rng.integers(0, k, n), probs.argmax(axis=1))
    a, b = uniform_marginals(n, k)
    # With budget < 1 the masses differ and POT never meets stopThr: it runs every iteration, so do we (tol=0).
    tol = TOL if budget == 1.0 else 0.0
    with x64():
        c = np.asarray(promptot.cost_matrix(jnp.asarray(probs), "logP"))
        assigned, selected, coupling = promptot.ot_assign(probs, reg=reg, budget=budget, tol=tol)
        mask = promptot.ot_clean_mask(probs, noisy, reg=reg, budget=budget, tol=tol)
        labels = promptot.ot_pseudo_labels(probs, reg=reg, budget=budget, tol=tol)
    ref = ot.sinkhorn(a, b * budget, c, reg, method="sinkhorn_log", numItermax=NUM_ITERS, stopThr=TOL)
    # the budget leaves POT's coupling the balanced one
    np.testing.assert_allclose(np.asarray(coupling), ref, rtol=1e-8, atol=1e-12 * ref.max())
    ref_assigned, ref_selected, ref_mask = repo_selection(ref, noisy, budget)
    assert labels.dtype == jnp.int32 and assigned.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(labels), ref_assigned)
    np.testing.assert_array_equal(np.asarray(assigned), ref_assigned)
    selected, mask = np.asarray(selected), np.asarray(mask)
    np.testing.assert_array_equal(mask, selected & (ref_assigned == noisy))
    if reg >= 0.01 or budget == 1.0:
        np.testing.assert_array_equal(selected, ref_selected)
        np.testing.assert_array_equal(mask, ref_mask)
    else:
        # At reg 0.001 most rows put all their mass 1/N on one class: the row maxima tie up to round-off, and
        # which of the tied rows fill the top-k is arbitrary (in the repo as well). The same k, up to ties:
        row_max = ref.max(axis=1)
        kth = np.sort(row_max)[::-1][int(n * budget) - 1]
        assert selected.sum() == int(n * budget)
        assert row_max[selected].min() >= kth * (1 - 1e-9) and row_max[~selected].max() <= kth * (1 + 1e-9)
        assert np.sum(np.isclose(row_max, 1 / n, rtol=1e-9)) > int(n * budget)  # the ties are at 1/N


@pytest.mark.parametrize("budget", [1.0, 0.9, 0.5, 0.29, 0.0])
def test_budget_selects_int_n_times_budget_examples(budget):
    n, k = 200, 20
    probs = dirichlet_probs(n, k, seed=5).astype(np.float32)
    noisy = np.random.default_rng(6).integers(0, k, n)
    assigned, selected, _ = promptot.ot_assign(probs, budget=budget)
    mask = np.asarray(promptot.ot_clean_mask(probs, noisy, budget=budget))
    assert int(np.sum(selected)) == int(n * budget)  # the repo's int(total * top_percent): 0.29 * 200 -> 57
    assert not (mask & ~np.asarray(selected)).any()
    np.testing.assert_array_equal(mask, np.asarray(selected) & (np.asarray(assigned) == noisy))
    # the assignment does not depend on the budget
    np.testing.assert_array_equal(np.asarray(assigned), np.asarray(promptot.ot_pseudo_labels(probs)))


@pytest.mark.parametrize("cost", promptot.COSTS)
@pytest.mark.parametrize("reg", [0.01, 0.001])
def test_confident_table_unselects_exactly_the_flipped_labels(cost, reg):
    """5 balanced classes, every example confidently its true class; the noisy labels of a few are flipped."""
    k, per_class = 5, 10
    clean = np.repeat(np.arange(k), per_class)
    confidence = np.linspace(0.80, 0.90, clean.size)  # distinct row maxima
    probs = np.repeat(((1 - confidence) / (k - 1))[:, None], k, axis=1)
    probs[np.arange(clean.size), clean] = confidence
    flipped = np.array([3, 17, 26, 38, 49])
    noisy = clean.copy()
    noisy[flipped] = (clean[flipped] + 1 + np.arange(flipped.size) % (k - 1)) % k
    assert (noisy[flipped] != clean[flipped]).all()
    for enable_x64 in (False, True):  # float32, float64
        with x64() if enable_x64 else contextlib.nullcontext():
            mask = np.asarray(promptot.ot_clean_mask(probs, noisy, reg=reg, cost=cost))
            labels = np.asarray(promptot.ot_pseudo_labels(probs, reg=reg, cost=cost))
        np.testing.assert_array_equal(np.flatnonzero(~mask), flipped)
        np.testing.assert_array_equal(labels, clean)
        assert promptot.selection_stats(mask, noisy, clean) == {"selected": 45, "precision": 1.0, "recall": 1.0}


def test_logP_cost_is_a_row_shift_of_out():
    """The repo's "logP" is log_softmax of the probabilities: -p plus a per-row constant, so its coupling is
    the "out" one (not that of -log p)."""
    probs = dirichlet_probs(50, 5, seed=9)
    with x64():
        logp = np.asarray(promptot.cost_matrix(probs, "logP"))
        out = np.asarray(promptot.cost_matrix(probs, "out"))
        shift = logp - out
        lse = np.log(np.exp(probs).sum(axis=1, keepdims=True))
        np.testing.assert_allclose(shift, np.broadcast_to(lse, shift.shape), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(promptot.cost_matrix(probs, "nll")), -np.log(probs), rtol=1e-12)
        sm = np.exp(probs) / np.exp(probs).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(np.asarray(promptot.cost_matrix(probs, "softmax")), -sm, rtol=1e-12)
        kw = dict(reg=0.05, num_iters=5000, tol=1e-13)
        c1 = np.asarray(promptot.ot_assign(probs, cost="logP", **kw)[2])
        c2 = np.asarray(promptot.ot_assign(probs, cost="out", **kw)[2])
    np.testing.assert_allclose(c1, c2, rtol=1e-9, atol=1e-13)
    with pytest.raises(ValueError, match="cost must be one of"):
        promptot.cost_matrix(probs, "logp")


def test_jit():
    n, k = 200, 20
    probs = jnp.asarray(dirichlet_probs(n, k, seed=21), jnp.float32)
    noisy = jnp.asarray(np.random.default_rng(22).integers(0, k, n), jnp.int32)
    eager = np.asarray(promptot.ot_clean_mask(probs, noisy, reg=0.001, budget=0.5))
    assert eager.any()

    @jax.jit
    def traced(probs, noisy, reg, budget):  # reg and budget traced
        return promptot.ot_clean_mask(probs, noisy, reg=reg, budget=budget), promptot.ot_assign(probs, budget=budget)

    mask, (_, selected, _) = traced(probs, noisy, 0.001, 0.5)
    np.testing.assert_array_equal(np.asarray(mask), eager)
    assert int(jnp.sum(selected)) == n // 2


@pytest.mark.parametrize("cost", ["logP", "nll"])
def test_float32_at_small_reg_is_finite_and_meets_the_marginals(cost):
    n, k = 200, 20
    probs = dirichlet_probs(n, k, seed=31).astype(np.float32)
    c = promptot.cost_matrix(probs, cost)
    assert c.dtype == jnp.float32
    a, b = (jnp.asarray(x, jnp.float32) for x in uniform_marginals(n, k))
    coupling, iters, err = promptot.sinkhorn_log_info(c, a, b, 0.001, 20000, 1e-4)
    assert coupling.dtype == jnp.float32
    coupling = np.asarray(coupling, np.float64)
    assert np.isfinite(coupling).all() and int(iters) < 20000 and float(err) < 1e-4
    np.testing.assert_allclose(coupling.sum(axis=1), 1 / n, rtol=1e-3)  # exact but for float32 round-off
    np.testing.assert_allclose(coupling.sum(axis=0), 1 / k, atol=1e-4)
    np.testing.assert_allclose(coupling.sum(), 1.0, atol=1e-4)
    # converged, the float32 assignment is float64's (after 1000 iterations a near-tie may differ)
    kw = dict(reg=0.001, cost=cost, num_iters=20000, tol=1e-5)
    with x64():
        ref = promptot.ot_pseudo_labels(probs.astype(np.float64), **kw)
    np.testing.assert_array_equal(np.asarray(promptot.ot_pseudo_labels(probs, **kw)), np.asarray(ref))


def test_selection_stats_by_hand():
    noisy = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    clean = np.array([0, 1, 2, 0, 0, 2, 2, 3])  # correct labels at 0, 1, 2, 4, 6, 7 (6 positives)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)  # selects 0, 1, 3, 5, 6: positives 0, 1, 6
    assert promptot.selection_stats(mask, noisy, clean) == {"selected": 5, "precision": 3 / 5, "recall": 3 / 6}
    none = promptot.selection_stats(np.zeros(8, bool), noisy, clean)
    assert none["selected"] == 0 and math.isnan(none["precision"]) and none["recall"] == 0.0
    all_wrong = promptot.selection_stats(mask, noisy, (noisy + 1) % 4)
    assert all_wrong["precision"] == 0.0 and math.isnan(all_wrong["recall"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy division warnings
        promptot.selection_stats(jnp.asarray(mask), jnp.asarray(noisy), jnp.asarray(clean))
