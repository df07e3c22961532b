"""Tests of dspt_jax.losses against independent references.

References: float64 numpy written here, closed-form gradients (docs/PROTOCOLS.md, section 1; for SCE, NCE+RCE and
Taylor CE checked against float64 finite differences here), hand-computed cases and PyTorch's
``F.cross_entropy(z.softmax(-1), y)`` for DSPT. The losses compute in float32, so tolerances are
float32 ones: relative ~1e-6 on values, and an absolute floor of a few float32 epsilons on gradients
(the softmax backward ``p * (g - <p, g>)`` cancels on the dominant class; CE's ``p_y - 1`` has the same floor).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dspt_jax import losses

ALL_LOSSES = ["dspt", "ce", "gce", "mae", "sce", "nce_rce", "taylor_ce"]
NEW_LOSSES = ["sce", "nce_rce", "taylor_ce"]
# (B, K): binary, small, large label space. Tests reuse these shapes so that jit compiles stay few.
SHAPES = [(7, 2), (16, 10), (5, 1000), (32, 100)]
# Logit scales: CoOp logits are 100 * cosine, so tens of units of spread are the realistic case.
SCALES = [0.5, 5.0, 50.0]
GCE_QS = [1e-4, 1e-2, 0.3, 0.7, 1.0]  # plus "gce" itself, q = 0.5
VALUE_RTOL = VALUE_ATOL = 2e-6
GRAD_RTOL, GRAD_ATOL = 1e-5, 3e-7


# ---------------------------------------------------------------- float64 numpy references


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def pick(a, y):
    return a[np.arange(len(y)), y]


def onehot(y, k):
    return np.eye(k)[y]


def ref_ce(z, y):
    return -pick(np_log_softmax(z), y)


def ref_dspt(z, y):
    """Literally p = softmax(z), q = softmax(p), -log q_y (p lies in [0, 1], so no overflow)."""
    p = np_softmax(z)
    q = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
    return -np.log(pick(q, y))


def ref_gce(z, y, q):
    return (1.0 - pick(np_softmax(z), y) ** q) / q


def ref_mae(z, y):
    """Half the L1 distance between p and the one-hot label (= 1 - p_y)."""
    return 0.5 * np.abs(np_softmax(z) - onehot(y, z.shape[-1])).sum(-1)


def ref_grad_dspt(z, y):
    """dL/dz_k = p_k * ((q_k - [k=y]) - (sum_j p_j q_j - p_y))."""
    p = np_softmax(z)
    q = np_softmax(p)
    inner = (p * q).sum(-1, keepdims=True) - pick(p, y)[:, None]
    return p * ((q - onehot(y, z.shape[-1])) - inner)


def ref_grad_ce(z, y):
    return np_softmax(z) - onehot(y, z.shape[-1])


def ref_grad_gce(z, y, q):
    p = np_softmax(z)
    return pick(p, y)[:, None] ** q * (p - onehot(y, z.shape[-1]))


def ref_grad_mae(z, y):
    return ref_grad_gce(z, y, 1.0)  # p_y (p_k - [k=y])


def ref_rce(z, y, log_zero):
    """Literally -sum_k p_k log q_k, with q = onehot(y) clipped from below at e^A (so log 0 reads A)."""
    q = np.clip(onehot(y, z.shape[-1]), math.exp(log_zero), 1.0)
    return -(np_softmax(z) * np.log(q)).sum(-1)


def ref_sce(z, y, alpha=0.1, beta=1.0, log_zero=-4.0):
    return alpha * ref_ce(z, y) + beta * ref_rce(z, y, log_zero)


def ref_nce(z, y):
    log_p = np_log_softmax(z)
    return -pick(log_p, y) / -log_p.sum(-1)


def ref_nce_rce(z, y, alpha=1.0, beta=1.0, log_zero=-4.0):
    return alpha * ref_nce(z, y) + beta * ref_rce(z, y, log_zero)


def ref_taylor(z, y, order=2):
    u = 1.0 - pick(np_softmax(z), y)
    return sum(u**i / i for i in range(1, order + 1))


def ref_grad_rce(z, y, log_zero):
    """-A (1 - p_y) -> -A p_y (p - onehot(y))."""
    return -log_zero * ref_grad_mae(z, y)


def ref_grad_sce(z, y, alpha=0.1, beta=1.0, log_zero=-4.0):
    return alpha * ref_grad_ce(z, y) + beta * ref_grad_rce(z, y, log_zero)


def ref_grad_nce(z, y):
    """a = -log p_y, b = -sum_k log p_k: da/dz = p - onehot(y), db/dz = K p - 1, d(a/b) = (da b - a db) / b^2."""
    k = z.shape[-1]
    log_p = np_log_softmax(z)
    p = np.exp(log_p)
    a = -pick(log_p, y)[:, None]
    b = -log_p.sum(-1, keepdims=True)
    return ((p - onehot(y, k)) * b - a * (k * p - 1.0)) / b**2


def ref_grad_nce_rce(z, y, alpha=1.0, beta=1.0, log_zero=-4.0):
    return alpha * ref_grad_nce(z, y) + beta * ref_grad_rce(z, y, log_zero)


def ref_grad_taylor(z, y, order=2):
    """d/du sum_i u^i / i = sum_{i<t} u^i, and du/dz = p_y (p - onehot(y)) with u = 1 - p_y."""
    u = 1.0 - pick(np_softmax(z), y)
    return sum(u**i for i in range(order))[:, None] * ref_grad_mae(z, y)


REF_VALUES = {"dspt": ref_dspt, "ce": ref_ce, "gce": lambda z, y: ref_gce(z, y, 0.5), "mae": ref_mae,
              "sce": ref_sce, "nce_rce": ref_nce_rce, "taylor_ce": ref_taylor}
REF_GRADS = {"dspt": ref_grad_dspt, "ce": ref_grad_ce, "gce": lambda z, y: ref_grad_gce(z, y, 0.5),
             "mae": ref_grad_mae, "sce": ref_grad_sce, "nce_rce": ref_grad_nce_rce, "taylor_ce": ref_grad_taylor}

def grad_floor(name, kwargs=None):
    """GRAD_ATOL scaled by the weights of a loss's terms: the float32 floor of the softmax backward on the
    dominant class (see the module docstring) is multiplied by them (alpha on CE, beta |A| on RCE)."""
    kwargs = kwargs or {}
    if name.startswith(("sce", "nce")):
        alpha = kwargs.get("alpha", 0.1 if name.startswith("sce") else 1.0)
        weights = alpha + kwargs.get("beta", 1.0) * -kwargs.get("log_zero", -4.0)
        return GRAD_ATOL * max(1.0, weights)
    return GRAD_ATOL


# Non-default hyperparameters of the new losses: name -> (keyword arguments, function, references).
NEW_VARIANTS = {
    "sce_cifar100": (dict(alpha=6.0, beta=0.1), losses.symmetric_cross_entropy, ref_sce, ref_grad_sce),
    "nce_rce_cifar100": (dict(alpha=10.0, beta=0.1, log_zero=math.log(1e-4)), losses.nce_rce, ref_nce_rce,
                         ref_grad_nce_rce),
    "nce_only": (dict(alpha=1.0, beta=0.0), losses.nce_rce, ref_nce_rce, ref_grad_nce_rce),
    "taylor_1": (dict(order=1), losses.taylor_cross_entropy, ref_taylor, ref_grad_taylor),
    "taylor_8": (dict(order=8), losses.taylor_cross_entropy, ref_taylor, ref_grad_taylor),
}


# ---------------------------------------------------------------- code under test, batched


def _variants():
    fns = dict(losses.LOSSES)
    for q in GCE_QS:
        fns[f"gce_{q}"] = functools.partial(losses.generalized_cross_entropy, q=q)
    return fns


@jax.jit
def _evaluate(z, y):
    # Every loss and its per-example gradient in one jitted function: one compile per input shape and
    # dtype, instead of op-by-op dispatch (which dominated the test time). Rows are independent, so the
    # gradient of the sum holds the per-example gradients.
    values, grads = {}, {}
    for name, fn in _variants().items():
        values[name] = fn(z, y)
        grads[name] = jax.grad(lambda zz: jnp.sum(fn(zz, y)))(z)
    return values, grads


def evaluate(z, y):
    """(values, grads): dicts name -> float64 numpy arrays, for the registered losses and every GCE q."""
    values, grads = _evaluate(jnp.asarray(z), jnp.asarray(y))
    for name in values:
        assert values[name].dtype == jnp.float32
    as64 = lambda d: {k: np.asarray(v, np.float64) for k, v in d.items()}
    return as64(values), as64(grads)


@jax.jit
def _evaluate_new_variants(z, y):
    # NEW_VARIANTS apart from _evaluate, so that only the tests that look at them pay for their compiles.
    values, grads = {}, {}
    for name, (kwargs, fn, _, _) in NEW_VARIANTS.items():
        f = functools.partial(fn, **kwargs)
        values[name] = f(z, y)
        grads[name] = jax.grad(lambda zz: jnp.sum(f(zz, y)))(z)
    return values, grads


def evaluate_new_variants(z, y):
    values, grads = _evaluate_new_variants(jnp.asarray(z), jnp.asarray(y))
    as64 = lambda d: {k: np.asarray(v, np.float64) for k, v in d.items()}
    return as64(values), as64(grads)


def make_batch(b, k, scale, seed):
    rng = np.random.default_rng(seed)
    z = (scale * rng.standard_normal((b, k))).astype(np.float32)
    y = rng.integers(0, k, size=b).astype(np.int32)
    return z, y


def max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------- values and gradients vs references


@pytest.mark.parametrize("b,k", SHAPES)
def test_values_and_gradients_match_float64_references(b, k):
    for i, scale in enumerate(SCALES):
        z, y = make_batch(b, k, scale, seed=1000 * k + 10 * b + i)
        z64 = z.astype(np.float64)
        values, grads = evaluate(z, y)
        for name in ALL_LOSSES:
            msg = f"{name} B={b} K={k} scale={scale}"
            assert values[name].shape == (b,)
            np.testing.assert_allclose(values[name], REF_VALUES[name](z64, y), rtol=VALUE_RTOL,
                                       atol=VALUE_ATOL, err_msg=msg)
            np.testing.assert_allclose(grads[name], REF_GRADS[name](z64, y), rtol=GRAD_RTOL,
                                       atol=grad_floor(name), err_msg=msg)
        for q in GCE_QS:
            np.testing.assert_allclose(values[f"gce_{q}"], ref_gce(z64, y, q), rtol=VALUE_RTOL,
                                       atol=VALUE_ATOL, err_msg=f"gce q={q} scale={scale}")
            np.testing.assert_allclose(grads[f"gce_{q}"], ref_grad_gce(z64, y, q), rtol=GRAD_RTOL,
                                       atol=GRAD_ATOL, err_msg=f"gce q={q} scale={scale}")
        values, grads = evaluate_new_variants(z, y)
        for name, (kwargs, _, ref_value, ref_grad) in NEW_VARIANTS.items():
            assert values[name].shape == (b,)
            msg = f"{name} B={b} K={k} scale={scale}"
            np.testing.assert_allclose(values[name], ref_value(z64, y, **kwargs), rtol=VALUE_RTOL,
                                       atol=VALUE_ATOL, err_msg=msg)
            np.testing.assert_allclose(grads[name], ref_grad(z64, y, **kwargs), rtol=GRAD_RTOL,
                                       atol=grad_floor(name, kwargs), err_msg=msg)


def test_single_class_losses_are_zero():
    # K = 1: p = q = [1], so every loss and every gradient is exactly 0.
    values, grads = evaluate(np.array([[3.0], [-2.0e4]], np.float32), np.array([0, 0], np.int32))
    for name in values:
        np.testing.assert_allclose(values[name], 0.0, atol=1e-7)
        np.testing.assert_allclose(grads[name], 0.0, atol=1e-7)


def test_hand_computed_binary_case_eagerly():
    # z = [0, log 3] -> p = [1/4, 3/4]. Label 0: CE = log 4; MAE = 3/4; GCE(1/2) = 2 (1 - 1/2) = 1;
    # DSPT = log(e^{1/4} + e^{3/4}) - 1/4. Eager (non-jitted) calls, as a user would make them.
    z = jnp.array([[0.0, math.log(3.0)]])
    y = jnp.array([0])
    assert losses.cross_entropy(z, y)[0] == pytest.approx(math.log(4.0), rel=1e-6)
    assert losses.mean_absolute_error(z, y)[0] == pytest.approx(0.75, rel=1e-6)
    assert losses.generalized_cross_entropy(z, y, q=0.5)[0] == pytest.approx(1.0, rel=1e-6)
    expected = math.log(math.exp(0.25) + math.exp(0.75)) - 0.25
    assert losses.double_softmax_cross_entropy(z, y)[0] == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- DSPT identities


@pytest.mark.parametrize("b,k", SHAPES)
def test_dspt_mae_plus_logsumexp_identity_and_bounds(b, k):
    upper = math.log(math.e + k - 1)
    for i, scale in enumerate(SCALES + [1e3]):
        z, y = make_batch(b, k, scale, seed=7 + i)
        out = evaluate(z, y)[0]["dspt"]
        p = np_softmax(z)
        identity = (1.0 - pick(p, y)) + np.log(np.exp(p).sum(-1)) - 1.0
        np.testing.assert_allclose(out, identity, rtol=VALUE_RTOL, atol=VALUE_ATOL)
        assert np.all(out >= upper - 1.0 - 2e-6) and np.all(out <= upper + 2e-6)


@pytest.mark.parametrize("b,k", SHAPES)
def test_dspt_bounds_are_attained_at_one_hot_probabilities(b, k):
    # p -> onehot(y) gives the lower bound log(e+K-1) - 1; p -> one-hot on another class the upper one.
    z = np.zeros((b, k), np.float32)
    z[:, 0] = 200.0
    y = np.zeros(b, np.int32)
    y[1::2] = 1
    upper = math.log(math.e + k - 1)
    np.testing.assert_allclose(evaluate(z, y)[0]["dspt"], np.where(y == 0, upper - 1.0, upper), rtol=1e-6)


@pytest.mark.parametrize("b,k", SHAPES)
def test_dspt_gradient_at_uniform_p_is_ce_gradient_over_k(b, k):
    # All-equal logits: p = q = 1/K, so dL/dz = (1/K) (1/K - onehot(y)) = (CE gradient) / K.
    z = np.full((b, k), 4.25, np.float32)
    y = np.arange(b, dtype=np.int32) % k
    grads = evaluate(z, y)[1]
    np.testing.assert_allclose(grads["dspt"], grads["ce"] / k, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grads["dspt"], (1.0 / k - onehot(y, k)) / k, rtol=1e-5, atol=1e-9)


def _confident(t, k=10):
    """Two rows with p -> onehot(class 0) as the margin t grows: label 0 (learned) and 1 (mislabeled)."""
    z = np.zeros((2, k), np.float32)
    z[:, 0] = t
    return z, np.array([0, 1], np.int32)


def test_dspt_saturation_zone_for_correct_and_wrong_confident_labels():
    # DSPT's gradient vanishes for a learned sample AND for a confidently mislabeled one; CE's gradient on
    # the mislabeled one tends to e_0 - e_1, of norm sqrt(2).
    norms_right, norms_wrong, ce_wrong = [], [], []
    for t in [2.0, 5.0, 10.0, 20.0, 40.0]:
        z, y = _confident(t)
        grads = evaluate(z, y)[1]
        np.testing.assert_allclose(grads["dspt"], ref_grad_dspt(z.astype(np.float64), y), rtol=GRAD_RTOL,
                                   atol=GRAD_ATOL)
        norms_right.append(np.linalg.norm(grads["dspt"][0]))
        norms_wrong.append(np.linalg.norm(grads["dspt"][1]))
        ce_wrong.append(np.linalg.norm(grads["ce"][1]))
    assert np.all(np.diff(norms_right) < 0) and np.all(np.diff(norms_wrong) < 0)
    # At t = 40 the off-class probabilities are e^-40 ~ 4e-18.
    assert norms_right[-1] < 1e-12 and norms_wrong[-1] < 1e-12
    assert ce_wrong[-1] == pytest.approx(math.sqrt(2.0), rel=1e-6)
    assert min(ce_wrong) > 1.0


@pytest.mark.parametrize("b,k", SHAPES)
def test_dspt_matches_pytorch_cross_entropy_of_softmax(b, k):
    for i, scale in enumerate(SCALES):
        z, y = make_batch(b, k, scale, seed=500 + i)
        zt = torch.tensor(z.astype(np.float64), requires_grad=True)
        lt = torch.nn.functional.cross_entropy(zt.softmax(-1), torch.tensor(y, dtype=torch.long),
                                               reduction="none")
        lt.sum().backward()
        values, grads = evaluate(z, y)
        np.testing.assert_allclose(values["dspt"], lt.detach().numpy(), rtol=VALUE_RTOL, atol=VALUE_ATOL)
        np.testing.assert_allclose(grads["dspt"], zt.grad.numpy(), rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_dspt_lowest_loss_is_at_argmax_logit():
    # The double softmax is monotone: over candidate labels, the smallest DSPT loss is at argmax z.
    b, k = SHAPES[1]
    z, _ = make_batch(b, k, 5.0, seed=11)
    per_label = np.stack([evaluate(z, np.full(b, c, np.int32))[0]["dspt"] for c in range(k)], axis=-1)
    np.testing.assert_array_equal(per_label.argmin(-1), z.argmax(-1))


# ---------------------------------------------------------------- GCE and MAE


@pytest.mark.parametrize("t", [10.0, 20.0, 30.0, 60.0])
def test_mae_gce_gradients_keep_relative_accuracy_in_the_tails(t):
    # p_y -> 0 (confident wrong label): the gradient p_y^q (p - onehot) is tiny but must not round to 0
    # (as differentiating -expm1(log p_y) would once p_y < float32 eps).
    z, y = _confident(t)
    z64 = z.astype(np.float64)
    grads = evaluate(z, y)[1]
    for q in GCE_QS:
        g, ref = grads[f"gce_{q}"], ref_grad_gce(z64, y, q)
        assert np.all(np.abs(g[1, :2]) > 0)
        # Relative accuracy down to float32's smallest normal number (e^-120 entries underflow to 0).
        np.testing.assert_allclose(g[1], ref[1], rtol=1e-5, atol=1.2e-38, err_msg=f"q={q}")
        np.testing.assert_allclose(g[0], ref[0], rtol=GRAD_RTOL, atol=GRAD_ATOL, err_msg=f"q={q}")
    np.testing.assert_allclose(grads["mae"], grads["gce_1.0"], rtol=1e-6, atol=0)


def test_gce_approaches_ce_as_q_goes_to_zero_and_equals_mae_at_q_one():
    b, k = SHAPES[1]
    z, y = make_batch(b, k, 3.0, seed=21)
    values, grads = evaluate(z, y)
    log_py = pick(np_log_softmax(z), y)
    prev_gap = np.inf
    for q in sorted(GCE_QS, reverse=True):
        # (1 - e^{q l}) / q = -l - q l^2 / 2 - ...: the gap to CE is at most q l^2 / 2 (l = log p_y <= 0).
        gap = np.max(np.abs(values[f"gce_{q}"] - values["ce"]))
        assert gap <= np.max(q * log_py**2 / 2) * 1.001 + 1e-6
        assert gap < prev_gap
        prev_gap = gap
    assert np.max(np.abs(values["gce_0.0001"] - values["ce"]) / values["ce"]) < 1e-3
    np.testing.assert_allclose(grads["gce_0.0001"], grads["ce"], rtol=1e-2, atol=1e-5)
    np.testing.assert_allclose(values["gce_1.0"], values["mae"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads["gce_1.0"], grads["mae"], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("bad_q", [0.0, -0.5, 1.5, float("nan"), "half", None])
def test_gce_rejects_invalid_q(bad_q):
    z, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="q"):
        losses.generalized_cross_entropy(z, y, q=bad_q)
    with pytest.raises(ValueError, match="q"):
        losses.get_loss_fn("gce", gce_q=bad_q)


def test_gce_rejects_traced_q():
    # q is a hyperparameter; a traced q cannot be range-checked, so it is refused with a clear error.
    z, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda q: losses.generalized_cross_entropy(z, y, q=q))(0.5)


# ---------------------------------------------------------------- SCE, NCE+RCE, Taylor CE


def _finite_difference_grad(fn, z, y, h=1e-6):
    """Central differences of a float64 numpy per-example loss, per logit (rows are independent)."""
    grad = np.zeros_like(z)
    for j in range(z.shape[-1]):
        step = np.zeros_like(z)
        step[:, j] = h
        grad[:, j] = (fn(z + step, y) - fn(z - step, y)) / (2 * h)
    return grad


@pytest.mark.parametrize("k", [2, 3, 10, 50])
def test_new_loss_reference_gradients_match_float64_finite_differences(k):
    # The closed-form gradients used as references above are themselves checked against the value formulas.
    z, y = make_batch(6, k, 3.0, seed=70 + k)
    z64 = z.astype(np.float64)
    cases = {name: ({}, REF_VALUES[name], REF_GRADS[name]) for name in NEW_LOSSES}
    cases.update({name: (kw, ref_value, ref_grad) for name, (kw, _, ref_value, ref_grad) in NEW_VARIANTS.items()})
    for name, (kwargs, ref_value, ref_grad) in cases.items():
        numeric = _finite_difference_grad(functools.partial(ref_value, **kwargs), z64, y)
        np.testing.assert_allclose(ref_grad(z64, y, **kwargs), numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_new_losses_hand_computed_binary_case_eagerly():
    # z = [0, log 3] -> p = [1/4, 3/4], label 0: CE = log 4, 1 - p_y = 3/4, sum_k -log p_k = log 4 + log(4/3).
    z = jnp.array([[0.0, math.log(3.0)]])
    y = jnp.array([0])
    ce, mae = math.log(4.0), 0.75
    assert losses.symmetric_cross_entropy(z, y)[0] == pytest.approx(0.1 * ce + 4.0 * mae, rel=1e-6)
    nce = ce / (ce + math.log(4.0 / 3.0))
    assert losses.nce_rce(z, y)[0] == pytest.approx(nce + 4.0 * mae, rel=1e-6)
    assert losses.taylor_cross_entropy(z, y)[0] == pytest.approx(mae + mae**2 / 2, rel=1e-6)
    assert losses.taylor_cross_entropy(z, y, order=3)[0] == pytest.approx(mae + mae**2 / 2 + mae**3 / 3, rel=1e-6)


def test_new_losses_special_cases_and_limits():
    b, k = SHAPES[1]
    z, y = make_batch(b, k, 3.0, seed=81)
    values, grads = evaluate(z, y)
    new_values, new_grads = evaluate_new_variants(z, y)
    values.update(new_values)
    grads.update(new_grads)
    # Taylor order 1 is MAE; SCE's RCE is -A * MAE; NCE lies in [0, 1].
    np.testing.assert_allclose(values["taylor_1"], values["mae"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads["taylor_1"], grads["mae"], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(values["sce"] - 0.1 * values["ce"], 4.0 * values["mae"], rtol=1e-5, atol=1e-6)
    assert np.all(values["nce_only"] >= 0.0) and np.all(values["nce_only"] <= 1.0)
    # Taylor CE increases with the order towards CE, and stays below it (every term is positive).
    gaps = [np.min(values["ce"] - values[name]) for name in ["taylor_1", "taylor_ce", "taylor_8"]]
    assert all(g > 0 for g in gaps) and np.all(np.diff(gaps) < 0)
    # With alpha = 1, beta = 0 SCE is CE.
    sce_as_ce = losses.symmetric_cross_entropy(z, y, alpha=1.0, beta=0.0)
    np.testing.assert_allclose(sce_as_ce, values["ce"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("t", [10.0, 30.0, 60.0])
def test_new_loss_gradients_keep_relative_accuracy_in_the_tails(t):
    # Row 1: p_y -> 0 (confidently wrong label). The bounded losses' gradients are tiny there (a factor p_y)
    # but must not round to 0 early (the expm1 branch of _one_minus_exp); row 0: p_y -> 1 (learned).
    z, y = _confident(t)
    z64 = z.astype(np.float64)
    grads = {**evaluate(z, y)[1], **evaluate_new_variants(z, y)[1]}
    for name in ["taylor_ce", "taylor_1", "taylor_8"]:
        kwargs, _, _, ref_grad = NEW_VARIANTS.get(name, ({}, None, None, REF_GRADS.get(name)))
        ref = ref_grad(z64, y, **kwargs)
        assert np.all(np.abs(grads[name][1, :2]) > 0), name
        # Relative accuracy on the mislabeled row down to float32's smallest normal number; the learned row
        # has the usual float32 floor of the softmax backward on the dominant class.
        np.testing.assert_allclose(grads[name][1], ref[1], rtol=1e-5, atol=1.2e-38, err_msg=name)
        np.testing.assert_allclose(grads[name][0], ref[0], rtol=GRAD_RTOL, atol=grad_floor(name, kwargs),
                                   err_msg=name)
    # SCE keeps CE's non-vanishing gradient on the wrong label; NCE's is of order 1/(K t), with an absolute
    # float32 floor on the dominant class where (p - onehot) b and a (K p - 1) cancel.
    for name in ["sce", "nce_rce", "nce_only"]:
        kwargs, _, _, ref_grad = NEW_VARIANTS.get(name, ({}, None, None, REF_GRADS.get(name)))
        np.testing.assert_allclose(grads[name], ref_grad(z64, y, **kwargs), rtol=1e-5,
                                   atol=grad_floor(name, kwargs), err_msg=name)


def _blobs(k, per_class=20, seed=0):
    """k well-separated Gaussian blobs on a circle of radius 4 in 2-D, plus a constant bias feature."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(k) / k
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], -1)
    x = (centers[:, None, :] + 0.4 * rng.standard_normal((k, per_class, 2))).reshape(-1, 2)
    x = np.concatenate([x, np.ones((len(x), 1))], -1).astype(np.float32)
    return x, np.repeat(np.arange(k), per_class).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_classes", "steps", "lr"))
def _train_linear(loss_fn, x, y, num_classes, steps, lr):
    """Plain full-batch gradient descent on a linear classifier from zero weights; returns (weights, losses)."""
    objective = lambda w: jnp.mean(loss_fn(x @ w, y))

    def step(w, _):
        value, grad = jax.value_and_grad(objective)(w)
        return w - lr * grad, value

    w0 = jnp.zeros((x.shape[-1], num_classes), jnp.float32)
    return jax.lax.scan(step, w0, None, length=steps)


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_losses_learn_a_separable_toy_task(name):
    k = 4
    x, y = _blobs(k, seed=3)
    w, history = _train_linear(losses.get_loss_fn(name), x, y, num_classes=k, steps=200, lr=1.0)
    history = np.asarray(history)
    accuracy = np.mean(np.argmax(np.asarray(x @ w), -1) == y)
    assert accuracy == 1.0, (name, accuracy)
    assert np.all(np.isfinite(history))
    # The loss decreases: overall by a wide margin, and step to step up to float32 rounding.
    assert history[-1] < 0.5 * history[0], (name, history[0], history[-1])
    assert np.all(np.diff(history) <= 1e-6 * np.abs(history[:-1]) + 1e-7), name


@pytest.mark.parametrize("bad", [dict(alpha=-1.0), dict(beta=float("nan")), dict(alpha="big"),
                                 dict(log_zero=0.0), dict(log_zero=4.0), dict(beta=float("inf"))])
def test_sce_and_nce_rce_reject_invalid_hyperparameters(bad):
    z, y = make_batch(2, 3, 1.0, seed=0)
    for fn in [losses.symmetric_cross_entropy, losses.nce_rce]:
        with pytest.raises(ValueError, match="|".join(bad)):
            fn(z, y, **bad)


@pytest.mark.parametrize("bad", [0, -2, 1.5, float("nan"), "two", None, True])
def test_taylor_rejects_invalid_order(bad):
    z, y = make_batch(2, 3, 1.0, seed=0)
    with pytest.raises(ValueError, match="order"):
        losses.taylor_cross_entropy(z, y, order=bad)


def test_new_losses_accept_integral_orders_and_reject_traced_hyperparameters():
    z, y = make_batch(2, 3, 1.0, seed=0)
    z64 = z.astype(np.float64)
    for order in [np.int64(3), 3.0]:
        np.testing.assert_allclose(losses.taylor_cross_entropy(z, y, order=order), ref_taylor(z64, y, 3),
                                   rtol=VALUE_RTOL, atol=VALUE_ATOL)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda a: losses.symmetric_cross_entropy(z, y, alpha=a))(0.1)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda a: losses.nce_rce(z, y, beta=a))(0.1)
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda t: losses.taylor_cross_entropy(z, y, order=t))(2)


# ---------------------------------------------------------------- extreme logits, dtypes, transforms


EXTREME_Z = np.array([
    [1e4, -1e4, 0.0, 0.0],
    [3e4, -3e4, 3e4, 0.0],
    [-3e4, -3e4, -3e4, -3e4],
    [1e4, 1e4 - 1.0, -3e4, 3e4],
    [-1e4, 2.5, -3e4, 1e4],
    [3e4, 3e4, 3e4, 3e4],
    [-3e4, 3e4, 1e4, -1e4],
], np.float32)


@pytest.mark.parametrize("label", range(EXTREME_Z.shape[1]))
def test_extreme_logits_give_finite_and_correct_values_and_gradients(label):
    y = np.full(EXTREME_Z.shape[0], label, np.int32)
    z64 = EXTREME_Z.astype(np.float64)
    values, grads = evaluate(EXTREME_Z, y)
    for name in values:
        assert np.all(np.isfinite(values[name])) and np.all(np.isfinite(grads[name])), name
    for name in ALL_LOSSES:
        # float32 log_softmax is exact up to eps * |z|: relative 1e-6 of values up to 6e4.
        np.testing.assert_allclose(values[name], REF_VALUES[name](z64, y), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(grads[name], REF_GRADS[name](z64, y), atol=grad_floor(name), err_msg=name)


def test_bfloat16_logits_give_float32_losses():
    b, k = SHAPES[3]
    z, y = make_batch(b, k, 20.0, seed=31)
    z_bf16 = jnp.asarray(z, jnp.bfloat16)
    values, grads = _evaluate(z_bf16, jnp.asarray(y))
    # float32 arithmetic on the bf16-rounded logits (bf16 arithmetic would be off by ~1e-2).
    z_rounded = np.asarray(z_bf16.astype(jnp.float32), np.float64)
    for name in ALL_LOSSES:
        assert values[name].dtype == jnp.float32 and grads[name].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(values[name]), REF_VALUES[name](z_rounded, y), rtol=VALUE_RTOL,
                                   atol=VALUE_ATOL, err_msg=name)
        # The gradient is rounded to bf16 (8 bits of mantissa) on the way out.
        np.testing.assert_allclose(np.asarray(grads[name], np.float64), REF_GRADS[name](z_rounded, y),
                                   rtol=1e-2, atol=1e-6, err_msg=name)


def test_eager_jit_and_vmap_agree():
    b, k = SHAPES[1]
    z, y = make_batch(b, k, 4.0, seed=41)
    for name in ALL_LOSSES:
        fn = losses.LOSSES[name]
        eager = np.asarray(fn(z, y))
        np.testing.assert_allclose(eager, REF_VALUES[name](z.astype(np.float64), y), rtol=VALUE_RTOL,
                                   atol=VALUE_ATOL)
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(z, y)), eager, rtol=1e-6, atol=1e-7)
        # vmap over a leading group axis [2, B/2, K] ...
        grouped = jax.jit(jax.vmap(fn))(z.reshape(2, b // 2, k), y.reshape(2, b // 2))
        np.testing.assert_allclose(np.asarray(grouped).reshape(-1), eager, rtol=1e-6, atol=1e-7)
        # ... and over single examples ([K] logits, scalar label).
        np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(z, y)), eager, rtol=1e-6, atol=1e-7)


def test_get_loss_fn_and_registry():
    b, k = SHAPES[1]
    z, y = make_batch(b, k, 2.0, seed=51)
    z64 = z.astype(np.float64)
    assert set(losses.LOSSES) == set(ALL_LOSSES)
    for name in ALL_LOSSES:
        np.testing.assert_allclose(jax.jit(losses.get_loss_fn(name))(z, y), REF_VALUES[name](z64, y),
                                   rtol=VALUE_RTOL, atol=VALUE_ATOL)
    gce = jax.jit(losses.get_loss_fn("gce", gce_q=0.3))
    np.testing.assert_allclose(gce(z, y), ref_gce(z64, y, 0.3), rtol=VALUE_RTOL, atol=VALUE_ATOL)
    # The new losses come with their default hyperparameters (gce_q is ignored for them).
    assert losses.get_loss_fn("sce") is losses.symmetric_cross_entropy
    assert losses.get_loss_fn("nce_rce", gce_q=0.3) is losses.nce_rce
    assert losses.get_loss_fn("taylor_ce") is losses.taylor_cross_entropy
    with pytest.raises(ValueError, match="'ce'.*'dspt'.*'gce'.*'mae'.*'nce_rce'.*'sce'.*'taylor_ce'"):
        losses.get_loss_fn("cross_entropy")


def test_invalid_inputs():
    b, k = SHAPES[1]
    z, y = make_batch(b, k, 2.0, seed=52)
    # Out-of-range labels (including -1, which must not wrap to the last class) give NaN rows.
    y_bad = y.copy()
    y_bad[1], y_bad[2] = -1, k
    values = evaluate(z, y_bad)[0]
    for name in values:
        assert np.all(np.isnan(values[name][1:3])) and np.all(np.isfinite(values[name][3:])), name
    for name in ALL_LOSSES:
        fn = losses.LOSSES[name]
        with pytest.raises(ValueError, match="integer"):
            fn(z, y.astype(np.float32))
        with pytest.raises(ValueError, match="shape"):
            fn(z, y[:3])
        with pytest.raises(ValueError, match="float"):
            fn(z.astype(np.int32), y)


# ---------------------------------------------------------------- masked_mean


def test_masked_mean_with_padding_rows():
    values = np.array([1.0, 2.0, 6.0, 100.0, -7.0], np.float32)
    for mask in [np.array([1, 1, 1, 0, 0], np.float32), np.array([True, True, True, False, False])]:
        out = losses.masked_mean(values, mask)
        assert out.shape == () and out.dtype == jnp.float32
        assert float(out) == pytest.approx(3.0)
        assert float(jax.jit(losses.masked_mean)(values, mask)) == pytest.approx(3.0)
        np.testing.assert_allclose(jax.grad(losses.masked_mean)(jnp.asarray(values), mask), mask / 3.0)
    # All padding: 0.0, not NaN, and a zero gradient.
    none = np.zeros(5, bool)
    assert float(losses.masked_mean(values, none)) == 0.0
    np.testing.assert_array_equal(jax.grad(losses.masked_mean)(jnp.asarray(values), none), 0.0)
    with pytest.raises(ValueError, match="shape"):
        losses.masked_mean(values, mask[:3])


def test_masked_mean_ignores_nan_padding_rows_in_value_and_gradient():
    # Padding rows carry label -1 and garbage logits: their loss is NaN, yet the masked mean and its
    # gradient equal those of the real rows alone, and the padding rows get exactly zero gradient.
    b, k = SHAPES[1]
    n_real = 12
    z, y = make_batch(b, k, 3.0, seed=61)
    z[n_real:] = 0.0
    z[n_real:, :2] = [3e4, -3e4]
    y[n_real:] = -1
    mask = (np.arange(b) < n_real).astype(np.float32)
    z64 = z[:n_real].astype(np.float64)

    @jax.jit
    def objectives(zz):
        return {name: jax.value_and_grad(lambda x: losses.masked_mean(fn(x, y), mask))(zz)
                for name, fn in losses.LOSSES.items()}

    for name, (loss_value, g) in objectives(jnp.asarray(z)).items():
        assert float(loss_value) == pytest.approx(np.mean(REF_VALUES[name](z64, y[:n_real])), rel=2e-6)
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g[n_real:], 0.0)
        np.testing.assert_allclose(g[:n_real], REF_GRADS[name](z64, y[:n_real]) / n_real, rtol=GRAD_RTOL,
                                   atol=grad_floor(name) / n_real)
