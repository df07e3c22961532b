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

Notation: ``z`` are the logits, ``p = softmax(z)``, ``y`` the label, ``K`` the number of classes.
"""

from __future__ import annotations

import functools
import math
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


LOSSES: dict[str, LossFn] = {
    "dspt": double_softmax_cross_entropy,
    "ce": cross_entropy,
    "gce": generalized_cross_entropy,  # with its default q = 0.5; use get_loss_fn to choose q
    "mae": mean_absolute_error,
}


def get_loss_fn(name: str, *, gce_q: float = 0.5) -> LossFn:
    """Returns the per-example loss ``(logits, labels) -> [B] float32`` named ``name``.

    Args:
        name: one of ``"dspt"``, ``"ce"``, ``"gce"``, ``"mae"``.
        gce_q: the GCE exponent, used (and validated) only when ``name == "gce"``.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an invalid ``gce_q``.
    """
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; valid choices are {sorted(LOSSES)}.")
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
