"""Training methods (`config.method`): the objective of a run's step, and what it recomputes before each epoch.

  coop      plain prompt tuning with `config.loss` (CoOp's trainer; DSPT is `coop` with `loss=dspt`)
  nlprompt  NLPrompt (Pan et al., CVPR 2025): optimal-transport purification of the training labels before
            every epoch, cross-entropy on the part it keeps and MAE on the rest (`methods/nlprompt.py`)
  joapr     JoAPR (Guo & Gu, CVPR 2024): a warm-up with a confidence penalty, then before every epoch a
            Gaussian-mixture split of the training set by loss; refined and pseudo labels, mixup and a
            uniform-prior penalty in the step (`methods/joapr.py`)
  elr       ELR (Liu et al., NeurIPS 2020): cross-entropy plus early-learning regularization towards a
            per-example memory of the model's own predictions, updated before every epoch (`methods/elr.py`)

A method is a `Method`: an `objective` that gives the per-example loss of a batch, and optionally `select`,
which computes per-example columns for every training example from the class probabilities under the current
prompt, before each epoch. The trainer adds each example's column entries to the batch (the objective reads
them), and stores each epoch's columns in the workdir (`method/epoch_NNNN.npz`), so a run resumed in the
middle of an epoch trains on the same ones, and a method whose selection depends on earlier epochs reads
them back from there (`SelectContext.previous`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from dspt_jax import losses

METHODS = ("coop", "nlprompt", "joapr", "elr")

# (logits_of, image_features [B, D], labels [B], batch) -> (per-example loss [B] float32, logits [B, K]).
# `logits_of(features)` gives the logits of image features under the step's prompt (differentiable in the
# prompt); the returned logits are those of `image_features` (the step's train accuracy reads them). `batch`
# holds the mask and the columns `select` made.
Objective = Callable


@dataclasses.dataclass(frozen=True)
class SelectContext:
    """What a selection may depend on beyond this epoch's probabilities."""

    epoch: int  # 0-based
    seed: int  # config.seed: randomness a selection draws must come from it (and the epoch)
    # previous(e) -> (columns, stats) saved for an earlier epoch e, or None when that epoch made none.
    previous: Callable[[int], tuple[dict, dict] | None]


# (probs [M, K] float64, noisy labels [M], clean labels [M] or None, context) -> (columns {name: [M] array},
# stats {name: number}). Every epoch's columns must have the same names, shapes and dtypes (one jitted step).
SelectFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None, SelectContext], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    objective: Objective
    # Equal keys mean the same objective: runs trained together share one branch of the step per key.
    key: tuple
    select: SelectFn | None = None


def on_logits(loss) -> Objective:
    """The objective of a loss of the batch's logits, `(logits, labels, batch) -> [B]`."""

    def objective(logits_of, image_features, labels, batch):
        logits = logits_of(image_features)
        return loss(logits, labels, batch), logits

    return objective


def plain(loss_fn) -> Objective:
    """The objective of a plain loss `(logits, labels) -> [B]` (`losses.py`)."""
    return on_logits(lambda logits, labels, batch: loss_fn(logits, labels))


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The method of `config.method`; raises ValueError naming the valid ones (or the bad setting)."""
    name = config.get("method", "coop")
    if name == "coop":
        q = config.gce_q if config.loss == "gce" else None
        fn = losses.get_loss_fn(config.loss, gce_q=0.5 if q is None else q)
        return Method("coop", plain(fn), ("coop", config.loss, q))
    if name == "nlprompt":
        from dspt_jax.methods import nlprompt

        return nlprompt.method(config.nlprompt)
    if name == "joapr":
        from dspt_jax.methods import joapr

        return joapr.method(config)
    if name == "elr":
        from dspt_jax.methods import elr

        return elr.method(config.elr)
    raise ValueError(f"config.method must be one of {METHODS}, got {name!r}")
