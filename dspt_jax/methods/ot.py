"""PromptOT: the optimal-transport label purification of NLPrompt, in pure JAX.

Source: Pan et al., "NLPrompt: Noise-Label Prompt Learning for Vision-Language Models", CVPR 2025, and its
code, github.com/qunovo/NLPrompt (`utils.py`: `OT_PL`, `curriculum_structure_aware_PL`, `get_masks`;
`trainers/nlprompt.py`: `before_epoch`). Before every epoch the repo scores the training set under the
current prompt and splits it into a "clean" part (trained with cross-entropy) and the rest (trained with MAE).

Rules followed (the repo's, for N examples and K classes):
  * Input: `probs` [N, K], the softmax of CLIP's logits (logit_scale.exp() * cosine, no other temperature).
  * Cost matrix, by `cost` (the repo's `Pmode`; its default is "logP"). The repo applies its transform to the
    *probabilities*, not to the logits:
        "logP"     C = -log_softmax(probs, axis=1)   (= -p_ik + logsumexp_k(p_i): a per-row shift of -p)
        "out"      C = -probs
        "softmax"  C = -softmax(probs, axis=1)
    A per-row constant does not change the optimal coupling, so "logP" and "out" give the same coupling (to the
    solver's tolerance): the repo's "logP" is *not* a -log p cost. For the cost the paper's notation suggests,
    this module adds (not in the repo):
        "nll"      C = -log(max(probs, tiny))
  * Marginals: a = 1/N for every example, b = 1/K for every class (balanced, uniform). The repo passes
    b = budget/K (see "budget" below).
  * Solver: entropic OT, POT's `ot.sinkhorn(a, b, M=C, reg=reg_e, numItermax=1000, stopThr=1e-6)` (plain-domain
    Sinkhorn-Knopp, float64). reg_e: 0.01 in train.py's config (and the only value before the scripts took a
    sweep), 0.001 in scripts/nlprompt/main.sh's default sweep.
  * Assignment: argmax of each coupling row (first index on ties, like torch.max).
  * Budget: the `budget` (<= 1) best-matched examples are "selected": the int(N * budget) examples with the
    largest row maximum of the coupling (torch.topk). Clean = selected AND assigned class == noisy label; every
    other example (selected with another class, or not selected) goes to the MAE part. With budget = 1 (the
    repo's default: CURRICLUM_EPOCH = 0 makes every epoch's budget 1) every example is selected, and
    clean = (assigned == noisy label). No other rule (no threshold, no agreement with the model's prediction).

Deviations, each deliberate:
  * Log-domain Sinkhorn (`sinkhorn_log`) instead of POT's plain-domain default. It runs exactly the iteration of
    POT's `method="sinkhorn_log"` (v, then u; uniform start; the column-marginal error checked after iterations
    1, 11, 21, ..., i.e. when the 0-based index is a multiple of 10), whose iterates equal the plain method's
    in exact arithmetic. The plain kernel exp(-C/reg) underflows at small reg: the repo's "logP" costs are all
    >= log K + 1/K - 1 (> 0.8 for K >= 5 classes), so every entry of exp(-C/0.001) is 0 in float64, POT stops
    at iteration 0 ("numerical errors") and returns the all-zero coupling, whose row argmax is class 0 for
    every example (torch.max takes the first index on ties). With reg_e = 0.001 the repo's "clean" set is
    therefore the examples whose noisy label is 0. The log domain has no such failure at any reg.
  * Budget: the repo's b = budget/K makes the marginals' masses differ (1 vs budget). Sinkhorn is invariant to
    scaling a marginal (the potentials drift by log(budget) per iteration and the coupling stays the balanced
    one); POT's log method then never meets stopThr and runs all numItermax iterations, and its plain method
    stops when the drift underflows. We solve the balanced problem (b = 1/K) directly: the same coupling as
    POT's log method, without the wasted iterations. The budget acts only through the top-k selection. It is
    *not* partial transport.
  * Convergence: `jax.lax.while_loop` that stops once the column-marginal error (L2 norm, as POT) is below
    `tol` at a check iteration, or after `num_iters` iterations (the repo's stopThr = 1e-6, numItermax = 1000).
    A while_loop rather than a fixed fori_loop, because the count of iterations then matches POT's, so the
    couplings agree to round-off even when the solver stops before convergence. Rows are met exactly (u is
    updated last), as in POT.
  * Dropped last batch: the repo scores the training set through its training loader (drop_last=True, random
    order, train-time augmentation), so each epoch the N mod batch_size examples of the last partial batch were
    never scored, counted "not selected" and trained with MAE whatever their label; the OT problem covered
    only the other examples. Here the caller passes all N examples (probabilities of the unaugmented images)
    and every one is scored.
  * Top-k ties: stable order (the lower index wins); torch.topk's order on ties is unspecified. At small reg
    most rows send all their mass 1/N to one class, so their maxima tie up to round-off and which of them a
    budget < 1 selects is arbitrary, in the repo as here.
  * Precision: the repo solves in float64. In float32 (JAX's default) the exponent -C/reg carries an absolute
    error of about eps * |C| / reg, i.e. a relative error of 1e-4..1e-3 in the coupling at reg = 0.001, so an
    example whose two best classes nearly tie may be assigned differently than in float64.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

COSTS = ("logP", "out", "softmax", "nll")
DEFAULT_REG = 0.01  # train.py's DATASET.REG_E (scripts/nlprompt/main.sh sweeps 0.001 by default)
DEFAULT_NUM_ITERS = 1000  # numItermax of the repo's ot.sinkhorn call
DEFAULT_TOL = 1e-6  # stopThr of the repo's ot.sinkhorn call
CHECK_EVERY = 10  # POT checks the marginal error when the iteration index is a multiple of 10


def _float_dtype(*arrays):
    dtype = jnp.result_type(*arrays)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _sinkhorn_log_impl(cost, a, b, reg, num_iters, tol, check_every):
    dtype = _float_dtype(cost, a, b)
    cost, a, b = (jnp.asarray(x, dtype) for x in (cost, a, b))
    mr = -cost / jnp.asarray(reg, dtype)
    log_a, log_b = jnp.log(a), jnp.log(b)

    def column_error(u, v):
        return jnp.linalg.norm(jnp.exp(mr + u[:, None] + v[None, :]).sum(axis=0) - b)

    def cond(state):
        i, _, _, _, done = state
        return (i < num_iters) & ~done

    def body(state):
        i, u, v, err, _ = state
        v = log_b - logsumexp(mr + u[:, None], axis=0)
        u = log_a - logsumexp(mr + v[None, :], axis=1)
        check = i % check_every == 0
        err = jax.lax.cond(check, column_error, lambda u, v: err, u, v)
        return i + 1, u, v, err, check & (err < tol)

    init = (jnp.asarray(0, jnp.int32), jnp.zeros(a.shape, dtype), jnp.zeros(b.shape, dtype),
            jnp.asarray(jnp.inf, dtype), jnp.asarray(False))
    n, u, v, err, _ = jax.lax.while_loop(cond, body, init)
    return jnp.exp(mr + u[:, None] + v[None, :]), n, err


_sinkhorn_jit = jax.jit(_sinkhorn_log_impl, static_argnums=6)


def sinkhorn_log_info(cost, a, b, reg, num_iters=DEFAULT_NUM_ITERS, tol=DEFAULT_TOL, *, check_every=CHECK_EVERY):
    """`sinkhorn_log`, also returning (iterations run, last column-marginal error checked)."""
    dtype = _float_dtype(cost, a, b)
    # one compiled program per shape and dtype, whatever the types of the scalars
    reg, tol = jnp.asarray(reg, dtype), jnp.asarray(tol, dtype)
    return _sinkhorn_jit(cost, a, b, reg, jnp.asarray(num_iters, jnp.int32), tol, int(check_every))


def sinkhorn_log(cost, a, b, reg, num_iters=DEFAULT_NUM_ITERS, tol=DEFAULT_TOL, *, check_every=CHECK_EVERY):
    """Entropic OT coupling [N, K] of `cost` [N, K] between `a` [N] and `b` [K], by log-domain Sinkhorn.

    Minimizes <P, cost> - reg * H(P) subject to P 1 = a, P^T 1 = b, with POT's `sinkhorn_log` iteration (see the
    module docstring): at most `num_iters` iterations, stopping once ||P^T 1 - b||_2 < `tol` at a check.
    Computes in the inputs' floating dtype: float32 by default, float64 for float64 inputs with x64 enabled
    (`jax.enable_x64(True)`). reg, num_iters and tol may be traced (jit-compiled once per shape and dtype).
    """
    return sinkhorn_log_info(cost, a, b, reg, num_iters, tol, check_every=check_every)[0]


@functools.partial(jax.jit, static_argnames="cost")
def _cost_matrix(probs, cost):
    probs = probs.astype(_float_dtype(probs))
    if cost == "logP":
        return -jax.nn.log_softmax(probs, axis=1)
    if cost == "out":
        return -probs
    if cost == "softmax":
        return -jax.nn.softmax(probs, axis=1)
    return -jnp.log(jnp.maximum(probs, jnp.finfo(probs.dtype).tiny))  # "nll"


def cost_matrix(probs, cost="logP"):
    """The OT cost [N, K] of class probabilities `probs` [N, K] in mode `cost` (one of COSTS)."""
    if cost not in COSTS:
        raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
    return _cost_matrix(jnp.asarray(probs), cost)


def _num_selected(n, budget):
    """int(n * min(1, budget)), as the repo's `int(total * top_percent)`; a traced budget is floored."""
    if isinstance(budget, (int, float, np.integer, np.floating)):
        return int(n * min(1.0, float(budget)))
    budget = jnp.minimum(jnp.asarray(budget), 1)
    return jnp.floor(n * budget).astype(jnp.int32)


def _select_top(row_max, k):
    """Mask [N] of the k largest `row_max`; the lower index first on ties."""
    order = jnp.argsort(-row_max, stable=True)
    rank = jnp.zeros(row_max.shape, jnp.int32).at[order].set(jnp.arange(row_max.shape[0], dtype=jnp.int32))
    return rank < k


@jax.jit
def _assign_rows(coupling, num_selected):
    assigned = jnp.argmax(coupling, axis=1).astype(jnp.int32)
    return assigned, _select_top(coupling.max(axis=1), num_selected)


def ot_assign(probs, *, reg=DEFAULT_REG, budget=1.0, cost="logP", num_iters=DEFAULT_NUM_ITERS, tol=DEFAULT_TOL):
    """(assigned [N] int32, selected [N] bool, coupling [N, K]) of NLPrompt's PromptOT on `probs` [N, K]:
    balanced uniform marginals, each row's argmax, and the int(N * budget) rows of largest maximum."""
    c = cost_matrix(probs, cost)
    n, k = c.shape
    a = jnp.full((n,), 1.0 / n, c.dtype)
    b = jnp.full((k,), 1.0 / k, c.dtype)
    coupling = sinkhorn_log(c, a, b, reg, num_iters, tol)
    return *_assign_rows(coupling, _num_selected(n, budget)), coupling


def ot_pseudo_labels(probs, *, reg=DEFAULT_REG, budget=1.0, cost="logP", num_iters=DEFAULT_NUM_ITERS,
                     tol=DEFAULT_TOL):
    """NLPrompt's OT pseudo-label [N] int32 of each example: the argmax of its coupling row.

    `budget` is accepted for symmetry with `ot_clean_mask`; the coupling, hence the assignment, does not depend
    on it (module docstring).
    """
    del budget
    return ot_assign(probs, reg=reg, cost=cost, num_iters=num_iters, tol=tol)[0]


def ot_clean_mask(probs, noisy_labels, *, reg=DEFAULT_REG, budget=1.0, cost="logP", num_iters=DEFAULT_NUM_ITERS,
                  tol=DEFAULT_TOL):
    """bool [N]: the examples NLPrompt trains with cross-entropy (selected by the budget, and OT-assigned to
    their own noisy label). Every example of the training set should be passed: the OT is over all of them."""
    assigned, selected, _ = ot_assign(probs, reg=reg, budget=budget, cost=cost, num_iters=num_iters, tol=tol)
    return selected & (assigned == jnp.asarray(noisy_labels).astype(jnp.int32))


def selection_stats(mask, noisy_labels, clean_labels) -> dict:
    """{"selected": number of examples in `mask`, "precision", "recall"} of a clean-label selection.

    A positive is an example whose noisy label is correct (noisy == clean). precision = fraction of the selected
    examples that are positives; recall = fraction of the positives that were selected. A ratio with an empty
    denominator (nothing selected; no positive) is float("nan"): a JSON writer should store it as null.
    """
    mask = np.asarray(mask, bool)
    positive = np.asarray(noisy_labels) == np.asarray(clean_labels)
    selected, positives, hits = int(mask.sum()), int(positive.sum()), int((mask & positive).sum())
    return {
        "selected": selected,
        "precision": hits / selected if selected else math.nan,
        "recall": hits / positives if positives else math.nan,
    }
