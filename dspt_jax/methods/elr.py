"""ELR, early-learning regularization (`config.method=elr`, settings in `config.elr`): Liu et al., "Early-Learning
Regularization Prevents Memorization of Noisy Labels", NeurIPS 2020 (shengliu66/ELR), one of the robust
baselines of the prompt-tuning-under-noise papers.

Rules followed (the paper's loss and the repo's ``elr_loss``):
  * Every training example has a target memory ``t`` (K numbers), zero at the start, updated as a temporal
    ensemble of the model's predictions: ``t <- beta t + (1 - beta) p / sum(p)``, with ``p`` the softmax clamped
    to ``[1e-4, 1 - 1e-4]`` and taken without gradient.
  * The loss is ``CE(z, y) + lambda * log(1 - <t, p>)`` (``p`` clamped as above, with gradient): the second term
    pulls the prediction towards the memory of its own early predictions, so an example's gradient from a
    wrong label is cancelled as the memory forms.
  * Defaults: the repo's CIFAR-10 values, ``beta = 0.7``, ``lambda = 3`` (CIFAR-100: 0.9 and 7).
Deviation, deliberate: the repo updates an example's memory in the step that trains it, from that step's
(augmented) prediction. Here the trainer's method hook runs before each epoch: every example's memory is
updated once per epoch -- as often as in the repo, where each example is seen once per epoch -- from the
prediction of the prompt at the epoch's start on the unaugmented image, and the step reads it. The memory is
saved with each epoch's selection (`method/epoch_NNNN.npz`), so a resumed run continues exactly.
`config.loss` is not used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dspt_jax import losses
from dspt_jax.methods import Method, SelectContext, on_logits

CLAMP = 1e-4  # the repo's bound on the probabilities (keeps log(1 - <t, p>) finite)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.beta = 0.7  # momentum of the target memory (the repo's CIFAR-10 value)
    c.lam = 3.0  # weight of the regularizer (the repo's CIFAR-10 value; `lambda` is a Python keyword)
    return c


def update_targets(targets: np.ndarray, probs: np.ndarray, beta: float) -> np.ndarray:
    """One temporal-ensembling update of the target memory ([M, K] float64)."""
    p = np.clip(np.asarray(probs, np.float64), CLAMP, 1 - CLAMP)
    return beta * np.asarray(targets, np.float64) + (1 - beta) * p / p.sum(-1, keepdims=True)


def elr_loss(logits, labels, targets, lam: float) -> jax.Array:
    """Per-example ``CE + lam * log(1 - <targets, clamp(softmax(logits))>)`` ([B] float32)."""
    z = jnp.asarray(logits).astype(jnp.float32)
    p = jnp.clip(jax.nn.softmax(z, axis=-1), CLAMP, 1 - CLAMP)
    reg = jnp.log(1 - jnp.sum(jnp.asarray(targets).astype(jnp.float32) * p, axis=-1))
    return losses.cross_entropy(z, labels) + lam * reg


def method(config: ml_collections.ConfigDict) -> Method:
    beta, lam = float(config.beta), float(config.lam)
    if not 0 <= beta < 1 or not lam >= 0:
        raise ValueError(f"config.elr.beta must be in [0, 1) and config.elr.lam >= 0, got {beta} and {lam}")

    def select(probs: np.ndarray, noisy: np.ndarray, clean: np.ndarray | None, context: SelectContext):
        saved = context.previous(context.epoch - 1) if context.epoch > 0 else None
        if context.epoch > 0 and saved is None:
            raise RuntimeError(f"ELR's target memory of epoch {context.epoch} is missing from the workdir's "
                               "method/ folder")
        old = np.zeros_like(probs) if saved is None else saved[0]["elr_target"]
        targets = update_targets(old, probs, beta)
        agree = targets.argmax(-1) == np.asarray(noisy)
        stats = {"target_agrees_with_label": float(agree.mean())}
        if clean is not None and (clean >= 0).all():
            stats["target_accuracy"] = float((targets.argmax(-1) == clean).mean())
        return {"elr_target": targets.astype(np.float32)}, stats

    def loss(logits, labels, batch):
        return elr_loss(logits, labels, batch["elr_target"], lam)

    return Method("elr", on_logits(loss), ("elr", beta, lam), select)
