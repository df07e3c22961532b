"""Training methods (`config.method`): the per-example loss of a run, and what it recomputes before each epoch.

  coop      plain prompt tuning with `config.loss` (CoOp's trainer; DSPT is `coop` with `loss=dspt`)
  nlprompt  NLPrompt (Pan et al., CVPR 2025): optimal-transport purification of the training labels before
            every epoch, cross-entropy on the part it keeps and MAE on the rest (`methods/nlprompt.py`)

A method is a `Method`: a per-example loss `(logits, labels, batch) -> [B]` that may read per-example columns
of the batch, and optionally `select`, which computes those columns for every training example from the
class probabilities under the current prompt, before each epoch. The trainer stores each epoch's columns in
the workdir (`method/epoch_NNNN.npz`), so a run resumed in the middle of an epoch trains on the same ones.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from dspt_jax import losses

METHODS = ("coop", "nlprompt")

# (probs [M, K], noisy labels [M], clean labels [M] or None) -> (columns {name: [M] array}, stats {name: float})
SelectFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None], tuple[dict, dict]]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    # (logits [B, K], labels [B], batch) -> per-example loss [B] float32; `batch` holds the columns `select` made.
    loss: Callable
    # Equal keys mean the same loss function: runs trained together share one branch of the step per key.
    key: tuple
    select: SelectFn | None = None


def plain(loss_fn):
    """A method loss (logits, labels, batch) -> [B] of a plain loss (logits, labels) -> [B]."""
    return lambda logits, labels, batch: loss_fn(logits, labels)


def get_method(config: ml_collections.ConfigDict) -> Method:
    """The method of `config.method`; raises ValueError naming the valid ones."""
    name = config.get("method", "coop")
    if name == "coop":
        q = config.gce_q if config.loss == "gce" else None
        fn = losses.get_loss_fn(config.loss, gce_q=0.5 if q is None else q)
        return Method("coop", plain(fn), ("coop", config.loss, q))
    if name == "nlprompt":
        from dspt_jax.methods import nlprompt

        return nlprompt.method(config.nlprompt)
    raise ValueError(f"config.method must be one of {METHODS}, got {name!r}")
