"""JoAPR as a method (`config.method=joapr`, settings in `config.joapr`): Guo & Gu, "JoAPR: Cleaning the Lens of
Prompt Learning for Vision-Language Models", CVPR 2024, as yunncheng/JoAPR@ffe5fdb runs it.

The pieces and the repo lines they follow are in `methods/joapr_core.py`; this module wires them into the
trainer's two hooks:

* `select`, before every epoch, on every training example's class probabilities under the current prompt
  (unaugmented images, as the repo's ``eval_train``):
    - warm-up epochs (the first `warmup_epochs`): nothing is selected; the step trains every example with
      ``CE + alpha1 * sum_k p_k log p_k``;
    - later epochs: the per-example ``CE + entropy``, min-max normalized, averaged with the normalized losses
      of the previous epochs (the last `loss_window` epochs after warm-up, this one included), a two-component
      Gaussian mixture, and the clean/noisy partition by either of the repo's two thresholds
      (`joapr_core.partition`); per clean example the weight of its given label in the refined target
      (`joapr_core.refinement_weights`). The noise-rate threshold carries over epochs: it is read back from the
      previous epoch's saved stats, so a resumed run continues exactly.
* `objective`, in the step: the model's own probabilities on the batch (no gradient) give the targets --
  ``sharpen(w y + (1 - w) p, T)`` for clean examples, ``sharpen(p, T)`` for noisy ones --, the batch is mixed
  with one ``lam = max(l, 1 - l)``, ``l ~ Beta(beta, beta)``, and a random permutation, and the loss is the soft
  cross-entropy of the mixed batch plus ``alpha2 * KL(uniform || mean prediction)``.

Defaults: the repo's rn50 recipe (`joapr_core.RN50_DEFAULTS`): warmup_epochs 1, alpha1 0.5, alpha2 0.5, beta
0.001, temperature 2, a 5-epoch loss window. `readme_settings=True` takes warmup_epochs, alpha1 and alpha2 from
the README's per-dataset table for the run's dataset and noise (symflip / pairflip at 2 ... 12 flipped of 16
shots; others are refused). The rest of the repo's recipe -- SGD lr 0.002, batch 32, cosine over 200 epochs with
one constant 1e-5 epoch, 16 context tokens, RN50 -- is CoOp's, i.e. this project's defaults with
`model.source=RN50`.

Deviations from the repo, each deliberate:
* Batches. The repo's epoch after warm-up runs max(len(clean loader), len(noisy loader)) steps, each on 32 clean
  and 32 noisy examples (the shorter loader restarts). Here an epoch is the trainer's usual pass over the whole
  training set in batches of `batch_size`, clean and noisy examples as they come; the partition decides each
  example's target, not how often it is seen.
* Mixup mixes the image features (the image tower's output, before its L2 normalization), not the images: with
  `image_features=cached` or `views:N` there are no images in the step, and one rule keeps the modes
  comparable. With the repo's beta = 0.001, lam lies within about 1e-3 of 1 almost always, so the mix is small
  either way.
* The randomness of the mix (one uniform number and one Beta draw per example and epoch) is drawn before the
  epoch from (config.seed, epoch) and saved with the selection: the batch's permutation sorts its examples'
  uniform numbers, its lam is its first example's draw. A resumed run mixes exactly as an uninterrupted one.
* The refinement weight pairs each example's clean probability with its own label probability (the repo pairs
  a randomly ordered list with an ordered one; see `joapr_core.refinement_weights`).
* One augmented view per example (the repo's K_TRANSFORMS default of 1); warm-up and training read the step's
  batch as the trainer gives it (augmented images, or cached features).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dspt_jax.methods import Method, SelectContext, ot
from dspt_jax.methods import joapr_core as core

LOSS_RULES = ("joapr", "weighted")
_D = core.RN50_DEFAULTS


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.warmup_epochs = _D["warmup_epochs"]  # epochs of CE + alpha1 * negative entropy before the partition
    c.alpha1 = _D["alpha1"]  # warm-up confidence-penalty weight
    c.alpha2 = _D["alpha2"]  # uniform-prior penalty weight after warm-up
    c.beta = _D["beta"]  # mixup's Beta(beta, beta)
    c.temperature = _D["temperature"]  # sharpening exponent T (p^T, as Dassl's sharpen_prob)
    c.loss_window = _D["loss_window"]  # epochs of normalized losses averaged (1: no averaging)
    c.gmm_max_iter = _D["gmm_max_iter"]
    c.gmm_tol = _D["gmm_tol"]
    c.gmm_reg_covar = _D["gmm_reg_covar"]
    c.initial_prob_threshold = _D["initial_prob_threshold"]
    c.loss_rule = "joapr"  # joapr: the repo's loss threshold | weighted: the weighted Gaussians' crossing
    # True: warmup_epochs, alpha1 and alpha2 from the repo README's table for the run's dataset and noise
    # (overriding the three fields above).
    c.readme_settings = False
    return c


def settings(config: ml_collections.ConfigDict) -> dict:
    """The method's settings for a run's `config` (`config.joapr`, or the README's table); ValueError if bad."""
    j = config.joapr
    s = {k: j[k] for k in default_config().keys() if k != "readme_settings"}
    if j.readme_settings:
        n = config.noise
        if n.kind not in ("symflip", "pairflip"):
            raise ValueError(
                f"config.joapr.readme_settings: the JoAPR README's table is for noise.kind symflip or pairflip, "
                f"got {n.kind!r}; set the three settings yourself (config.joapr.warmup_epochs, alpha1, alpha2)")
        flips = n.num_flips if n.num_flips is not None else int(n.rate * config.data.shots)
        s.update(core.readme_setting(config.data.name, n.kind, flips, config.data.shots))
    if s["loss_rule"] not in LOSS_RULES:
        raise ValueError(f"config.joapr.loss_rule must be one of {LOSS_RULES}, got {s['loss_rule']!r}")
    for field in ("warmup_epochs", "loss_window", "gmm_max_iter"):
        if int(s[field]) != s[field] or s[field] < (0 if field == "warmup_epochs" else 1):
            raise ValueError(f"config.joapr.{field} must be an integer >= "
                             f"{0 if field == 'warmup_epochs' else 1}, got {s[field]!r}")
    if not s["beta"] > 0 or not s["temperature"] > 0:
        raise ValueError("config.joapr.beta and config.joapr.temperature must be > 0")
    return s


# ------------------------------------------------------------------------------------- before each epoch


def _mix_draws(seed: int, epoch: int, num_examples: int, beta: float) -> dict:
    """Per example: a uniform number (the batch's permutation) and ``max(l, 1 - l)``, ``l ~ Beta(beta, beta)``."""
    rng = np.random.default_rng([int(seed) % 2**32, int(epoch), 0x10A9])
    u = rng.random(num_examples).astype(np.float32)
    lam = rng.beta(beta, beta, num_examples)
    return {"mix_u": u, "mix_lam": np.maximum(lam, 1 - lam).astype(np.float32)}


def select(s: dict, probs: np.ndarray, noisy: np.ndarray, clean: np.ndarray | None, context: SelectContext):
    """This epoch's columns (`joapr_warmup`, `joapr_clean`, `joapr_weight`, `joapr_norm_loss`, `mix_u`,
    `mix_lam`) and stats. Post-warm-up stats: the partition's size, precision and recall against the clean
    labels, both thresholds, and the mixture's means."""
    m = len(noisy)
    columns = _mix_draws(context.seed, context.epoch, m, s["beta"])
    warm = context.epoch < s["warmup_epochs"]
    columns["joapr_warmup"] = np.full(m, warm)
    if warm:  # the repo scores nothing in warm-up epochs
        columns.update(joapr_clean=np.zeros(m, bool), joapr_weight=np.zeros(m, np.float32),
                       joapr_norm_loss=np.zeros(m, np.float32))
        return columns, {"warmup": 1, "examples": m}
    norm = core.normalize_losses(core.partition_loss_from_probs(probs, noisy))
    # The previous post-warm-up epochs' normalized losses (the repo's history[-window:], this epoch last).
    first = max(s["warmup_epochs"], context.epoch - s["loss_window"] + 1)
    history = core.LossHistory.create(m, s["loss_window"])
    prev_threshold = s["initial_prob_threshold"]
    for e in range(first, context.epoch):
        saved = context.previous(e)
        if saved is None:
            raise RuntimeError(f"JoAPR's selection of epoch {e + 1} is missing from the workdir's method/ folder; "
                               "it is needed for this epoch's averaged loss")
        history = history.push(saved[0]["joapr_norm_loss"])
    if context.epoch > s["warmup_epochs"]:
        prev_threshold = context.previous(context.epoch - 1)[1]["prob_threshold"]
    history = history.push(norm)
    avg = history.mean() if s["loss_window"] > 1 else norm
    part = core.partition(avg, prev_threshold, n_total=m, max_iter=s["gmm_max_iter"], tol=s["gmm_tol"],
                          reg_covar=s["gmm_reg_covar"], loss_rule=s["loss_rule"])
    first_after_warmup = context.epoch == s["warmup_epochs"]
    label_prob = None if first_after_warmup else probs[np.arange(m), noisy]
    weight = core.refinement_weights(part.clean_prob, label_prob)
    columns.update(joapr_clean=part.clean, joapr_weight=np.where(part.clean, weight, 0).astype(np.float32),
                   joapr_norm_loss=norm.astype(np.float32))
    stats = {"warmup": 0, "selected": int(part.clean.sum()), "examples": m}
    if clean is not None and (clean >= 0).all():
        stats.update({k: v for k, v in ot.selection_stats(part.clean, noisy, clean).items() if k != "selected"})
    means = (np.sort(part.gmm.means) if part.gmm is not None else [float("nan")] * 2)
    stats.update(prob_threshold=part.prob_threshold, loss_threshold=part.loss_threshold,
                 gmm_mean_clean=float(means[0]), gmm_mean_noisy=float(means[1]))
    return columns, stats


# ---------------------------------------------------------------------------------------------- the step


def batch_permutation(u, mask) -> jax.Array:
    """A permutation of the batch ([B] int32) that pairs the real rows among themselves at random (by their
    uniform numbers `u`) and leaves padding rows in place: the i-th real row (in batch order) is paired with
    the real row of the i-th smallest `u`."""
    mask = jnp.asarray(mask).astype(bool)
    rows = jnp.arange(mask.shape[0])
    random_order = jnp.argsort(jnp.where(mask, u, 2.0 + rows))  # real rows by u, then the padding in order
    batch_order = jnp.argsort(~mask, stable=True)  # real rows in order, then the padding in order
    return jnp.zeros_like(rows).at[batch_order].set(random_order)


def objective(s: dict):
    alpha1, alpha2, temperature = float(s["alpha1"]), float(s["alpha2"]), float(s["temperature"])

    def fn(logits_of, image_features, labels, batch):
        logits = logits_of(image_features)
        warm = core.warmup_loss(logits, labels, alpha1)
        probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
        clean = batch["joapr_clean"][:, None]
        targets = jnp.where(clean, core.refine_labels(labels, probs, batch["joapr_weight"], temperature),
                            core.pseudo_labels(probs, temperature))
        mask = batch["mask"]
        perm = batch_permutation(batch["mix_u"], mask)
        lam = batch["mix_lam"][jnp.argmax(mask)]  # the batch's first real row's draw
        mixed_x, mixed_y = core.mixup(image_features.astype(jnp.float32), targets, lam, perm)
        mixed_logits = logits_of(mixed_x)
        penalty = core.uniform_prior_penalty(core.mean_prediction(mixed_logits, mask))
        # Its masked batch mean is the repo's loss: mean soft CE + alpha2 * penalty (a batch-level term).
        mix = core.soft_cross_entropy(mixed_logits, mixed_y) + alpha2 * penalty
        return jnp.where(batch["joapr_warmup"], warm, mix), logits

    return fn


def method(config: ml_collections.ConfigDict) -> Method:
    s = settings(config)
    key = ("joapr",) + tuple(sorted((k, s[k]) for k in ("alpha1", "alpha2", "temperature")))
    return Method("joapr", objective(s), key, lambda *args: select(s, *args))

