"""Pure per-example classification losses for prompt tuning under label noise.

Every loss is a pure function ``loss(logits, labels) -> per_example_loss`` with

* ``logits``: float array ``[B, K]`` of any float dtype (bfloat16 included); more generally ``[..., K]``,
* ``labels``: integer array ``[B]`` (generally ``logits.shape[:-1]``) with values in ``[0, K)``,
* result: float32 array ``[B]``; the arithmetic is done in float32 whatever the input dtype.

They are built on ``log_softmax``/``logsumexp`` so that logits in the tens of thousands stay finite, and
they work under ``jax.jit``, ``jax.vmap`` and ``jax.grad``. No globals, no config objects.

Labels outside ``[0, K)`` (for example ``-1`` on padding rows) give a NaN loss for that row rather than a
silently wrong number. Reduce with :func:`masked_mean`, which ignores masked rows even when they are NaN,
and whose gradient with respect to the logits of those rows is exactly zero.

Losses (name in :data:`LOSSES` / ``--config.loss``): ``dspt`` (the method), ``ce`` (CoOp), and the
robust baselines ``gce``, ``mae``, ``sce`` (symmetric CE), ``nce_rce`` (active-passive NCE+RCE) and
``taylor_ce`` (Taylor CE), each with the defaults documented on its function.

Notation: ``z`` are the logits, ``p = softmax(z)``, ``y`` the label, ``K`` the number of classes.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _log_probs_and_label_log_prob(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Returns (log_softmax(z) as float32 [..., K], log p_y as float32 [...]); checks shapes and dtypes."""
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"logits must have shape [B, K]; got shape {logits.shape}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be a float array; got dtype {logits.dtype}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array of class indices; got dtype {labels.dtype}.")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must have shape logits.shape[:-1]; got labels {labels.shape} "
                         f"for logits {logits.shape}.")
    # float32 inside: with bfloat16 the K entries of the second softmax (which differ by O(1/K)) would
    # collapse onto a handful of representable values.
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # mode="fill" without negative wrapping: an out-of-range label (e.g. -1 padding) reads NaN, loudly,
    # instead of silently reading the last class; its backward pass drops the cotangent for that row.
    label_log_prob = jnp.take_along_axis(
        log_probs, labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan,
        wrap_negative_indices=False)[..., 0]
    return log_probs, label_log_prob


def _one_minus_exp(x: jax.Array) -> jax.Array:
    """``1 - exp(x)`` for ``x <= 0``, accurate in value and in gradient over the whole range.

    ``-expm1(x)`` is exact near 0, but JAX differentiates ``expm1`` as ``expm1(x) + 1``, which rounds to 0
    once ``exp(x)`` drops below float32 epsilon; ``1 - exp(x)`` has no cancellation when ``exp(x) < 1/2``.
    """
    return jnp.where(x > -math.log(2.0), -jnp.expm1(x), 1.0 - jnp.exp(x))


def cross_entropy(logits, labels) -> jax.Array:
    """Softmax cross-entropy per example: ``L = -log softmax(z)_y = logsumexp(z) - z_y``.

    Gradient ``dL/dz = p - onehot(y)``: it does not vanish on a confidently wrong label (its norm tends to
    ``sqrt(2)``), which is why cross-entropy (CoOp) memorizes noisy labels.
    """
    _, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    return -label_log_prob


def double_softmax_cross_entropy(logits, labels) -> jax.Array:
    """DSPT, Double-Softmax Prompt Tuning loss (arXiv 2605.00591), per example.

    ``p = softmax(z)``; ``q = softmax(p)`` (a second softmax on the probability vector, no temperature);
    ``L = -log q_y``. In PyTorch terms ``F.cross_entropy(z.softmax(-1), y, reduction="none")``. There is no
    stop-gradient: the gradient flows through both softmaxes.

    Identities (all exact):

    * ``L = logsumexp(p) - p_y = (1 - p_y) + logsumexp(p) - 1``: an MAE term ``1 - p_y`` plus a term that
      depends on the whole probability vector; for large K it behaves like MAE.
    * ``log(e + K - 1) - 1 <= L <= log(e + K - 1)`` (lower bound at ``p = onehot(y)``, upper bound at
      ``p`` = one-hot on another class).
    * ``dL/dz_k = p_k * ((q_k - [k=y]) - (sum_j p_j q_j - p_y))``.
    * At uniform ``p`` (all logits equal) the gradient is exactly ``1/K`` times the cross-entropy gradient.
    * The gradient tends to 0 whenever ``p`` tends to any one-hot vector: a learned sample, and also a
      confidently mislabeled one (the "saturation zone" that makes DSPT robust to label noise).
    * ``argmax q = argmax p = argmax z`` (both softmaxes are monotone), so prediction is ``argmax z``.

    Computed in float32 whatever the input dtype, since the entries of ``q`` differ only by ``O(1/K)``.
    """
    log_probs, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    probs = jnp.exp(log_probs)
    # -log q_y = logsumexp(p) - p_y; p_y is taken from the gathered log-probability so that an invalid
    # label makes the loss NaN instead of reading some other class.
    return jax.nn.logsumexp(probs, axis=-1) - jnp.exp(label_log_prob)


def _check_gce_q(q) -> float:
    """Validates the GCE exponent (a Python/numpy scalar hyperparameter) and returns it as a float."""
    try:
        q_value = float(q)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"GCE q must be a concrete number in (0, 1]; got {q!r}.") from e
    if not 0.0 < q_value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"GCE q must satisfy 0 < q <= 1; got q={q!r} (q -> 0 is cross-entropy, q = 1 is MAE).")
    return q_value


def generalized_cross_entropy(logits, labels, q: float = 0.5) -> jax.Array:
    """Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018), per example: ``L = (1 - p_y^q) / q``.

    ``q`` in ``(0, 1]`` interpolates between cross-entropy (``q -> 0``: ``L -> -log p_y``) and MAE
    (``q = 1``: ``L = 1 - p_y``). Gradient ``dL/dz = p_y^q * (p - onehot(y))``. Computed as
    ``(1 - exp(q * log p_y)) / q`` with an ``expm1`` branch, so that small q loses no digits to
    cancellation.

    Raises:
        ValueError: if ``q`` is not a concrete number with ``0 < q <= 1``.
    """
    q = _check_gce_q(q)
    _, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    return _one_minus_exp(q * label_log_prob) / q


def mean_absolute_error(logits, labels) -> jax.Array:
    """Mean absolute error on probabilities (Ghosh et al. 2017), per example: ``L = 1 - p_y``.

    Equals half the L1 distance between ``p`` and ``onehot(y)``. Gradient ``dL/dz_k = p_y (p_k - [k=y])``.
    Computed from ``log p_y`` with an ``expm1`` branch, accurate even when ``p_y`` is close to 1.
    """
    _, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    return _one_minus_exp(label_log_prob)


def _check_hyperparameter(name: str, value, *, loss: str, negative: bool = False) -> float:
    """Validates a loss hyperparameter, a concrete finite number ``>= 0`` (``< 0`` if ``negative``)."""
    try:
        v = float(value)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"{loss} {name} must be a concrete number; got {value!r}.") from e
    if not math.isfinite(v):
        raise ValueError(f"{loss} {name} must be finite; got {value!r}.")
    if negative and not v < 0.0:
        raise ValueError(f"{loss} {name} must be < 0; got {value!r}.")
    if not negative and v < 0.0:
        raise ValueError(f"{loss} {name} must be >= 0; got {value!r}.")
    return v


def _reverse_cross_entropy(label_log_prob: jax.Array, log_zero: float) -> jax.Array:
    """RCE ``-sum_k p_k log q_k`` with ``q`` = onehot(y) clipped so that ``log 0 = log_zero`` (``A < 0``).

    ``log q_y = 0`` and ``log q_k = A`` for ``k != y``, hence ``RCE = -A * sum_{k != y} p_k = -A (1 - p_y)``:
    a multiple of MAE, bounded by ``-A``.
    """
    return -log_zero * _one_minus_exp(label_log_prob)


def symmetric_cross_entropy(logits, labels, alpha: float = 0.1, beta: float = 1.0,
                            log_zero: float = -4.0) -> jax.Array:
    """Symmetric cross-entropy, SCE (Wang et al., ICCV 2019), per example: ``L = alpha CE + beta RCE``.

    ``CE = -log p_y``; ``RCE = -sum_k p_k log q_k`` is the reverse cross-entropy, with the label
    distribution ``q = onehot(y)`` clipped so that ``log 0`` reads ``A = log_zero``, which makes
    ``RCE = -A (1 - p_y)``. Hence ``L = -alpha log p_y - beta A (1 - p_y)`` and
    ``dL/dz = (alpha - beta A p_y) (p - onehot(y))``.

    Defaults: ``alpha = 0.1, beta = 1.0`` are the paper's CIFAR-10 values (it uses ``alpha = 6.0,
    beta = 0.1`` on CIFAR-100); ``A = -4`` is the paper's choice. (The widely copied PyTorch ``SCELoss``
    clamps the one-hot at ``1e-4``, i.e. ``A = log 1e-4 ~= -9.21``: pass ``log_zero=math.log(1e-4)`` to match
    it; only the product ``beta * A`` matters.)

    Raises:
        ValueError: unless ``alpha, beta >= 0`` and ``log_zero < 0`` are concrete finite numbers.
    """
    alpha = _check_hyperparameter("alpha", alpha, loss="SCE")
    beta = _check_hyperparameter("beta", beta, loss="SCE")
    log_zero = _check_hyperparameter("log_zero", log_zero, loss="SCE", negative=True)
    _, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    return alpha * -label_log_prob + beta * _reverse_cross_entropy(label_log_prob, log_zero)


def nce_rce(logits, labels, alpha: float = 1.0, beta: float = 1.0, log_zero: float = -4.0) -> jax.Array:
    """Active-passive loss NCE+RCE (Ma et al., ICML 2020), per example: ``L = alpha NCE + beta RCE``.

    ``NCE = (-log p_y) / (-sum_k log p_k)`` is the normalized cross-entropy (the "active" term, in
    ``[0, 1]``), and ``RCE = -A (1 - p_y)`` the reverse cross-entropy of :func:`symmetric_cross_entropy`
    (the "passive" term). The NCE denominator is at least ``K log K > 0`` for ``K >= 2``; with ``K = 1``
    the ratio is ``0 / 0`` and is defined as 0 (the label is certain). Gradient of NCE, with
    ``a = -log p_y`` and ``b = -sum_k log p_k``: ``dNCE/dz = ((p - onehot(y)) b - a (K p - 1)) / b^2``.

    Defaults: ``alpha = beta = 1`` are the paper's CIFAR-10 values (it uses ``alpha = 10, beta = 0.1`` on
    CIFAR-100); ``A = -4`` as in SCE (the authors' code clamps at ``1e-4``, ``A = log 1e-4``; see
    :func:`symmetric_cross_entropy`).

    Raises:
        ValueError: unless ``alpha, beta >= 0`` and ``log_zero < 0`` are concrete finite numbers.
    """
    alpha = _check_hyperparameter("alpha", alpha, loss="NCE+RCE")
    beta = _check_hyperparameter("beta", beta, loss="NCE+RCE")
    log_zero = _check_hyperparameter("log_zero", log_zero, loss="NCE+RCE", negative=True)
    log_probs, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    # An invalid label makes label_log_prob NaN. Keep that NaN out of the quotient: the division's backward
    # pass multiplies the (zero, on a masked row) cotangent by -a/b^2, and 0 * NaN would reach the logits
    # through the denominator. The NaN is put back by the final `where`, whose backward pass is a select.
    valid = ~jnp.isnan(label_log_prob)
    numerator = -jnp.where(valid, label_log_prob, 0.0)
    denominator = -jnp.sum(log_probs, axis=-1)
    positive = denominator > 0.0  # False only for K = 1 (and for NaN logits)
    nce = jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)
    nce = jnp.where(valid, nce, jnp.nan)
    return alpha * nce + beta * _reverse_cross_entropy(label_log_prob, log_zero)


def _check_taylor_order(order) -> int:
    """Validates the Taylor order (a concrete integer >= 1) and returns it as an int."""
    if isinstance(order, bool):
        raise ValueError(f"Taylor CE order must be an integer >= 1; got {order!r}.")
    try:
        value = operator.index(order)
    except TypeError:
        try:
            as_float = float(order)
        except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
            raise ValueError(f"Taylor CE order must be a concrete integer >= 1; got {order!r}.") from e
        if not (math.isfinite(as_float) and as_float.is_integer()):
            raise ValueError(f"Taylor CE order must be an integer >= 1; got {order!r}.") from None
        value = int(as_float)
    if value < 1:
        raise ValueError(f"Taylor CE order must be an integer >= 1; got {order!r} (order 1 is MAE).")
    return value


def taylor_cross_entropy(logits, labels, order: int = 2) -> jax.Array:
    """Taylor cross-entropy (Feng et al., IJCAI 2020), per example: ``L = sum_{i=1..t} (1 - p_y)^i / i``.

    The order-``t`` Taylor polynomial of ``-log p_y`` around ``p_y = 1``: ``t = 1`` is MAE, ``t = 2`` is
    MAE plus half the squared error on the label, and ``t -> infinity`` gives cross-entropy. With
    ``u = 1 - p_y``: ``dL/dz = (sum_{i=0..t-1} u^i) p_y (p - onehot(y))`` (for large ``t`` this tends to
    the CE gradient ``p - onehot(y)``). ``L <= sum_{i=1..t} 1/i``, bounded, hence robust.

    Default: ``t = 2``, the second-order member the paper uses as its example (MAE + MSE-like); the paper
    treats ``t`` as a per-dataset hyperparameter (``t = 1`` recovers MAE; larger ``t`` fits faster and
    is less robust). ``u`` is computed from ``log p_y`` with an ``expm1`` branch and the polynomial by
    Horner's rule, so values and gradients are accurate both for ``p_y -> 1`` and ``p_y -> 0``.

    Raises:
        ValueError: if ``order`` is not a concrete integer ``>= 1``.
    """
    order = _check_taylor_order(order)
    _, label_log_prob = _log_probs_and_label_log_prob(logits, labels)
    u = _one_minus_exp(label_log_prob)
    # Horner: u (1 + u (1/2 + u (1/3 + ... + u / t))).
    acc = jnp.full_like(u, 1.0 / order)
    for i in range(order - 1, 0, -1):
        acc = 1.0 / i + u * acc
    return u * acc


LOSSES: dict[str, LossFn] = {
    "dspt": double_softmax_cross_entropy,
    "ce": cross_entropy,
    "gce": generalized_cross_entropy,  # with its default q = 0.5; use get_loss_fn to choose q
    "mae": mean_absolute_error,
    "sce": symmetric_cross_entropy,  # alpha = 0.1, beta = 1, A = -4 (SCE paper, CIFAR-10)
    "nce_rce": nce_rce,  # alpha = beta = 1, A = -4 (Ma et al. 2020, CIFAR-10)
    "taylor_ce": taylor_cross_entropy,  # order t = 2
}


def get_loss_fn(name: str, *, gce_q: float = 0.5) -> LossFn:
    """Returns the per-example loss ``(logits, labels) -> [B] float32`` named ``name``.

    Args:
        name: one of ``"dspt"``, ``"ce"``, ``"gce"``, ``"mae"``, ``"sce"``, ``"nce_rce"``, ``"taylor_ce"``;
            the last three with their documented default hyperparameters.
        gce_q: the GCE exponent, used (and validated) only when ``name == "gce"``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an invalid ``gce_q``.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r} (config.loss); valid choices are {sorted(LOSSES)}.")
    if name == "gce":
        return functools.partial(generalized_cross_entropy, q=_check_gce_q(gce_q))
    return LOSSES[name]


def masked_mean(per_example, mask) -> jax.Array:
    """Mean of ``per_example`` over the entries where ``mask`` is true, as a float32 scalar.

    ``mask`` is bool or float (nonzero means a real example, zero a padding row) with the shape of
    ``per_example``. Masked entries are excluded with ``where``, not multiplied by zero, so a NaN or inf
    on a padding row (e.g. a loss evaluated at label -1) neither leaks into the value nor into the
    gradient. With no real example the result is 0.0, not NaN.
    """
    per_example = jnp.asarray(per_example)
    mask = jnp.asarray(mask)
    if mask.shape != per_example.shape:
        raise ValueError(f"mask shape {mask.shape} must equal per_example shape {per_example.shape}.")
    real = mask.astype(bool)
    total = jnp.sum(jnp.where(real, per_example.astype(jnp.float32), 0.0))
    count = jnp.sum(real, dtype=jnp.float32)
    return total / jnp.maximum(count, 1.0)
