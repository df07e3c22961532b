"""NLPrompt (Pan et al., "NLPrompt: Noise-Label Prompt Learning for Vision-Language Models", CVPR 2025).

Rules followed (qunovo/NLPrompt):
  * Before every epoch (the first included, with the initial prompt), every training example's class
    probabilities under the current prompt, on the unaugmented image (the test transform), are turned into
    pseudo-labels by entropic optimal transport ("PromptOT", `methods/ot.py`, which states the repo's rules
    and this code's deviations from them): the repo's cost modes, uniform marginals over examples and over
    classes, each example assigned to the argmax of its coupling row.
  * An example is "clean" when its assigned class equals its (noisy) label (and, with budget < 1, it is among
    the int(budget * N) best-matched examples). The epoch trains clean examples with cross-entropy and the
    others with MAE (the paper's PromptMAE; the repo's is GCE with q = 1, i.e. 1 - p_y, as
    `losses.mean_absolute_error`): one loss per example, averaged over the batch.
Deviations, each deliberate:
  * Every training example is scored before each epoch. The repo's scoring loader dropped the last partial
    batch, so a few examples were never scored and never selected.
  * Scores come from the unaugmented image. The repo scored through its training loader, i.e. a fresh random
    crop and flip of each image.
  * `config.loss` is not used: the method fixes its losses.
Each epoch's selection is logged with its size and, against the clean labels the noise was made from, its
precision (selected examples whose label is right) and recall (right labels that were selected).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np

from dspt_jax import losses
from dspt_jax.methods import Method, SelectContext, on_logits, ot


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.reg = ot.DEFAULT_REG  # entropic regularization reg_e (see methods/ot.py on the repo's values)
    c.cost = "logP"  # the repo's default cost mode (`ot.COSTS`)
    c.budget = 1.0  # share of the examples that may be selected (1: the repo's default, every example)
    c.num_iters = ot.DEFAULT_NUM_ITERS  # Sinkhorn iterations at most (the repo's numItermax)
    c.tol = ot.DEFAULT_TOL  # stop once the class marginals are met to this (the repo's stopThr)
    return c


def loss(logits, labels, batch):
    """CE where the epoch's OT selection kept the example, MAE elsewhere."""
    ce = losses.cross_entropy(logits, labels)
    mae = losses.mean_absolute_error(logits, labels)
    return jnp.where(batch["ot_clean"], ce, mae)


def method(config: ml_collections.ConfigDict) -> Method:
    settings = dict(reg=float(config.reg), cost=str(config.cost), budget=float(config.budget),
                    num_iters=int(config.num_iters), tol=float(config.tol))

    def select(probs: np.ndarray, noisy: np.ndarray, clean: np.ndarray | None, context: SelectContext):
        mask = np.asarray(ot.ot_clean_mask(jnp.asarray(probs), jnp.asarray(noisy), **settings))
        stats = {"selected": int(mask.sum()), "examples": int(mask.size)}
        if clean is not None and (clean >= 0).all():  # precision and recall (NaN when undefined)
            stats.update({k: v for k, v in ot.selection_stats(mask, noisy, clean).items() if k != "selected"})
        return {"ot_clean": mask}, stats

    return Method("nlprompt", on_logits(loss), ("nlprompt",), select)
