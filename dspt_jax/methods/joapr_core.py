"""JoAPR's pure pieces (Guo & Gu, "JoAPR: Cleaning the Lens of Prompt Learning for Vision-Language Models",
CVPR 2024), written from the rules of yunncheng/JoAPR at commit ffe5fdb (the files cited as ``joapr.py:L`` are
``trainers/joapr.py`` there; ``train.py:L`` its ``train.py``; ``rn50.yaml`` is ``configs/trainers/JoAPR/rn50.yaml``;
Dassl is KaiyangZhou/Dassl.pytorch). No trainer code lives here: the trainer wires these together.

The method, as the repo runs it:

* Warm-up (``joapr.py:325-327``, ``forward_backward_x`` ``joapr.py:539-568``): ``WARMUP_EPOCH`` epochs of
  ``CE + ALPHA1 * mean(sum_k p_k log p_k)`` on the whole (noisy) training set, with training augmentation
  (:func:`warmup_loss`).
* Before each later epoch (``eval_train``, ``joapr.py:613-683``): every training example's ``CE + entropy``
  (``joapr.py:628-632``; :func:`partition_loss`) in eval mode on the unaugmented image, min-max normalized over
  the training set (``joapr.py:636``; :func:`normalize_losses`), averaged over the last 5 epochs' normalized losses
  (``joapr.py:637-644``; :class:`LossHistory`), a 2-component 1-D ``GaussianMixture(max_iter=10, tol=1e-2,
  reg_covar=5e-4)`` (``joapr.py:648``; :func:`fit_gmm_1d`), and the clean probability = posterior of the
  lower-mean component (``joapr.py:650-653, 672``; :func:`clean_probability`).
* Two rules mark an example clean, either suffices (``joapr.py:668, 674-678``; :func:`partition`): its averaged
  loss is below a Gaussian-crossing threshold (:func:`joapr_intersection_threshold`), or its clean probability
  exceeds the estimated noise rate (:func:`noise_rate_threshold`, stateful: it starts at 0.5, ``joapr.py:244``).
* Training (``forward_backward``, ``joapr.py:410-537``): per batch of clean and noisy examples, clean targets
  ``sharpen(w y + (1 - w) p, T)`` (:func:`refine_labels`, with ``w`` from :func:`refinement_weights`), noisy
  targets ``sharpen(p, T)`` (:func:`pseudo_labels`), both under ``no_grad``; then mixup of the concatenated
  batch with ``lam = max(l, 1 - l)``, ``l ~ Beta(BETA, BETA)`` (:func:`sample_mixup_lambda`, :func:`mixup`),
  and the loss ``soft CE + ALPHA2 * KL(uniform || mean prediction)`` (:func:`mixmatch_loss`).

Host-side pieces (the partition) are numpy float64; the pieces of the training step are JAX, float32 inside, and
work under ``jax.jit``. The repo's deviations from its own apparent intent, and ours from the repo, are listed on
each function.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REPO = "yunncheng/JoAPR@ffe5fdb"

# ------------------------------------------------------------------------------------------------ defaults

# TRAINER.JOAPR.* as the repo's scripts/main.sh runs them: train.py:85-97 (extend_cfg) merged with rn50.yaml
# (rn50.yaml:28-33 overrides WARMUP_EPOCH 20 -> 1 and ALPHA2 1.0 -> 0.5), plus the fixed GMM settings of
# joapr.py:648 and the initial probability threshold of joapr.py:244.
RN50_DEFAULTS = types.MappingProxyType({
    "warmup_epochs": 1,  # rn50.yaml:33 (train.py:94 default 20)
    "alpha1": 0.5,  # warm-up negative-entropy weight, rn50.yaml:31 (train.py:96 same)
    "alpha2": 0.5,  # uniform-prior penalty weight, rn50.yaml:32 (train.py:97 default 1.0)
    "beta": 0.001,  # mixup Beta(beta, beta), rn50.yaml:30 (train.py:95 same)
    "temperature": 2.0,  # sharpening exponent, train.py:91 (TEMP = 2)
    "average_loss": True,  # train.py:93
    "loss_window": 5,  # joapr.py:641 history[-5:]
    "gmm_max_iter": 10,  # joapr.py:648
    "gmm_tol": 1e-2,  # joapr.py:648
    "gmm_reg_covar": 5e-4,  # joapr.py:648
    "initial_prob_threshold": 0.5,  # joapr.py:244 self.thres
    # rn50.yaml, the rest of the recipe (trainer-level, not used in this module):
    "batch_size": 32, "lr": 0.002, "max_epoch": 200, "optimizer": "sgd", "lr_scheduler": "cosine",
    "lr_warmup_epochs": 1, "lr_warmup_type": "constant", "lr_warmup_cons_lr": 1e-5,
    "n_ctx": 16, "csc": False, "class_token_position": "end", "prec": "amp", "shots": 16,
})

# README "The settings of Warmup epochs, alpha1, and alpha2": dataset -> noise kind -> one
# (warmup_epochs, alpha1, alpha2) per noise ratio 12.5%, 25%, ..., 75%, i.e. 2, 4, ..., 12 flipped shots of 16.
_RATIOS_FP = (2, 4, 6, 8, 10, 12)


def _rows(warmup, alpha1, alpha2):
    expand = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * 6  # noqa: E731
    return tuple(zip(expand(warmup), expand(alpha1), expand(alpha2)))


README_SETTINGS = types.MappingProxyType({
    "imagenet": {"symflip": _rows(1, 0.5, 1.0), "pairflip": _rows(1, 0.5, 1.0)},
    "sun397": {"symflip": _rows(1, 0.5, 1.0), "pairflip": _rows(1, 0.5, 1.0)},
    "caltech101": {"symflip": _rows(1, 0.5, 0.5), "pairflip": _rows(1, 0.5, 0.5)},
    "oxford_flowers": {"symflip": _rows((20, 20, 20, 20, 20, 1), 0.5, 1.0),
                       "pairflip": _rows((20, 20, 20, 1, 1, 1), 0.5, 1.0)},
    "stanford_cars": {"symflip": _rows(1, 0.5, 1.0), "pairflip": _rows(1, 0.5, 1.0)},
    "fgvc_aircraft": {"symflip": _rows(150, (0.1, 0.1, 0.1, 0.1, 0.1, 0.5), 1.0),
                      "pairflip": _rows(150, (0.1, 0.1, 0.1, 0.1, 0.1, 0.5), 1.0)},
    "oxford_pets": {"symflip": _rows(1, 0.2, 1.0), "pairflip": _rows(1, 0.2, 1.0)},
    "ucf101": {"symflip": _rows((20, 20, 20, 20, 20, 1), 0.5, 1.0),
               "pairflip": _rows((20, 20, 1, 1, 1, 1), 0.5, 1.0)},
    "eurosat": {"symflip": _rows((10, 10, 10, 1, 1, 1), (0.2, 0.2, 0.2, 0.2, 0.2, 0.1), 1.0),
                "pairflip": _rows((10, 10, 10, 10, 1, 1), (0.2, 0.2, 0.2, 0.2, 0.2, 0.1), 1.0)},
    "dtd": {"symflip": _rows(1, 0.2, 1.0), "pairflip": _rows(1, (0.2, 0.2, 0.2, 0.2, 0.2, 0.1), 1.0)},
})


def readme_setting(dataset: str, noise_kind: str, num_fp: int, shots: int = 16) -> dict:
    """``{"warmup_epochs", "alpha1", "alpha2"}`` of the README table for ``num_fp`` flipped shots of ``shots``.

    The table covers 16 shots with 2, 4, ..., 12 flipped; other ratios raise ValueError (so do datasets the
    README does not list, e.g. food101). ``beta`` and ``temperature`` are the same everywhere
    (:data:`RN50_DEFAULTS`).
    """
    if dataset not in README_SETTINGS:
        raise ValueError(f"the JoAPR README has no settings for {dataset!r}; it lists {sorted(README_SETTINGS)}")
    if noise_kind not in ("symflip", "pairflip"):
        raise ValueError(f"noise_kind must be 'symflip' or 'pairflip', got {noise_kind!r}")
    ratio = num_fp / shots
    fps = [fp for fp in _RATIOS_FP if math.isclose(fp / 16, ratio)]
    if not fps:
        raise ValueError(f"the JoAPR README covers noise ratios 2/16 ... 12/16; got {num_fp}/{shots}")
    warmup, alpha1, alpha2 = README_SETTINGS[dataset][noise_kind][_RATIOS_FP.index(fps[0])]
    return {"warmup_epochs": warmup, "alpha1": alpha1, "alpha2": alpha2}


# ------------------------------------------------------------------------------- per-example losses (JAX)


def _log_probs(logits) -> jax.Array:
    return jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)


def _label_log_prob(log_probs, labels) -> jax.Array:
    labels = jnp.asarray(labels)
    return jnp.take_along_axis(log_probs, labels[..., None], axis=-1, mode="fill", fill_value=jnp.nan,
                               wrap_negative_indices=False)[..., 0]


def negative_entropy(logits) -> jax.Array:
    """``sum_k p_k log p_k`` per example ([B], float32, <= 0): the repo's ``NegEntropy`` before its batch mean.

    Repo: ``NegEntropy.__call__`` (joapr.py:219-222) ``mean(sum(probs.log() * probs, 1))``. Computed here with
    ``log_softmax``, so a probability that underflows to 0 contributes 0 instead of the repo's ``0 * -inf = NaN``.
    """
    log_p = _log_probs(logits)
    return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def warmup_loss(logits, labels, alpha1: float = RN50_DEFAULTS["alpha1"]) -> jax.Array:
    """Per-example warm-up loss ``CE + alpha1 * sum_k p_k log p_k`` ([B], float32).

    Repo: ``forward_backward_x`` (joapr.py:554-557): ``F.cross_entropy(output, y) + ALPHA1 * NegEntropy(output)``
    on the augmented image (train transform), every training example, hard (noisy) labels. Its batch mean is the
    repo's loss (both terms are batch means). Minimising the negative entropy is a confidence penalty.
    """
    log_p = _log_probs(logits)
    ce = -_label_log_prob(log_p, labels)
    return ce + alpha1 * jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def partition_loss(logits, labels) -> jax.Array:
    """Per-example loss the partition is fitted on: ``CE + entropy`` ([B], float32).

    Repo: ``eval_train`` (joapr.py:628-632): ``F.cross_entropy(output, label, reduction='none')`` plus
    ``-sum(probs.log() * probs)`` when ``self.epoch >= self.warmup_epoch`` -- always true there, because
    ``eval_train`` only runs in the epochs after warm-up (joapr.py:330, 343). Eval mode, test transform (no
    augmentation): ``Dataloader_eval`` builds it with ``build_transform(cfg, is_train=False)``
    (datasets/data_manager.py:84).
    """
    log_p = _log_probs(logits)
    return -_label_log_prob(log_p, labels) - jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def partition_loss_from_probs(probs, labels, eps: float = 1e-30) -> np.ndarray:
    """:func:`partition_loss` from class probabilities ``[N, K]`` (numpy float64): ``-log p_y - sum p log p``.

    For a trainer that scores the training set as probabilities. ``eps`` only keeps ``log 0`` finite.
    """
    p = np.asarray(probs, np.float64)
    labels = np.asarray(labels)
    log_p = np.log(np.maximum(p, eps))
    return -log_p[np.arange(p.shape[0]), labels] - np.sum(p * log_p, axis=-1)


# ------------------------------------------------------------------------------ partition (numpy float64)


def normalize_losses(losses) -> np.ndarray:
    """Min-max normalization of the per-example losses to [0, 1] ([N] float64).

    Repo: joapr.py:636 ``losses = (losses - losses.min()) / (losses.max() - losses.min())`` over the whole
    training set (float32 there). Deviation: constant input gives zeros here (the repo divides 0 by 0, and the
    NaNs then make sklearn raise).
    """
    x = np.asarray(losses, np.float64).reshape(-1)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise ValueError("losses must be a non-empty array of finite numbers")
    span = x.max() - x.min()
    if not span > 0:
        return np.zeros_like(x)
    return (x - x.min()) / span


def average_last_epochs(buffer, count: int) -> np.ndarray:
    """Mean of the last ``min(count, window)`` rows pushed into a ring buffer ``[window, N]``.

    Repo: joapr.py:637-642 ``self.loss.append(losses); history = torch.stack(self.loss);
    input_loss = history[-5:].mean(0)`` -- the current epoch's normalized losses included, and fewer than 5
    rows while fewer epochs have been scored (``AVERAGE_LOSS = True``, train.py:93).
    """
    buffer = np.asarray(buffer, np.float64)
    if count < 1:
        raise ValueError("no epoch of losses has been pushed yet")
    # The ring fills rows 0, 1, ... in order and then overwrites the oldest; the order does not matter to a mean.
    return buffer[:min(int(count), buffer.shape[0])].mean(axis=0)


@dataclasses.dataclass(frozen=True)
class LossHistory:
    """The last ``window`` epochs of normalized per-example losses, as arrays (checkpointable).

    ``buffer`` ``[window, N]`` float64 is a ring: epoch number ``c`` (0-based) goes to row ``c % window``;
    ``count`` is how many epochs were pushed. Use :meth:`state_dict` / :meth:`from_state_dict` to save it.
    """

    buffer: np.ndarray
    count: int = 0

    @classmethod
    def create(cls, num_examples: int, window: int = RN50_DEFAULTS["loss_window"]) -> "LossHistory":
        if window < 1 or num_examples < 1:
            raise ValueError("window and num_examples must be >= 1")
        return cls(np.zeros((window, num_examples), np.float64), 0)

    @property
    def window(self) -> int:
        return self.buffer.shape[0]

    def push(self, normalized_losses) -> "LossHistory":
        """A new history with this epoch's normalized losses ``[N]`` added (the oldest row dropped when full)."""
        row = np.asarray(normalized_losses, np.float64).reshape(-1)
        if row.shape[0] != self.buffer.shape[1]:
            raise ValueError(f"expected {self.buffer.shape[1]} losses, got {row.shape[0]}")
        buffer = self.buffer.copy()
        buffer[self.count % self.window] = row
        return LossHistory(buffer, self.count + 1)

    def mean(self) -> np.ndarray:
        """The averaged losses the mixture is fitted to ([N]); see :func:`average_last_epochs`."""
        return average_last_epochs(self.buffer, self.count)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.copy(), "count": np.asarray(self.count, np.int64)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "LossHistory":
        return cls(np.asarray(state["buffer"], np.float64).copy(), int(np.asarray(state["count"])))


class GMM1D(NamedTuple):
    """A fitted two-component 1-D Gaussian mixture (sklearn's ``weights_``, ``means_``, ``covariances_``)."""

    weights: np.ndarray  # [2]
    means: np.ndarray  # [2]
    variances: np.ndarray  # [2] (reg_covar included, as sklearn's covariances_)
    n_iter: int = 0
    converged: bool = False
    lower_bound: float = -np.inf  # mean log-likelihood per example, as sklearn's lower_bound_


def two_means_labels(x) -> np.ndarray:
    """Labels (0 = lower cluster, 1 = upper) of the optimal 2-means split of 1-D data ([N] int).

    Stands in for sklearn's k-means initialisation (``GaussianMixture`` default ``init_params='kmeans'``:
    ``KMeans(n_clusters=2, n_init=1, random_state=None)`` labels; the repo leaves ``random_state`` unset, so its
    k-means++ seeding is random). In 1-D every 2-means solution is a split of the sorted data; this returns the
    split of least within-cluster sum of squares, which is what Lloyd's algorithm reaches from k-means++ for any
    two-cluster loss distribution; on data where Lloyd's can stop at another local optimum the two may differ.
    Needs at least two distinct values.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    order = np.argsort(x, kind="stable")
    xs = x[order] - x.mean()
    n = xs.size
    sizes = np.arange(1, n)  # left cluster sizes for splits after position s-1
    csum = np.cumsum(xs)[:-1]
    csq = np.cumsum(xs * xs)[:-1]
    tot, tot_sq = xs.sum(), (xs * xs).sum()
    sse = (csq - csum ** 2 / sizes) + ((tot_sq - csq) - (tot - csum) ** 2 / (n - sizes))
    valid = xs[1:] > xs[:-1]  # never split between equal values
    if not valid.any():
        raise ValueError("2-means needs at least two distinct values")
    sse = np.where(valid, sse, np.inf)
    split = int(np.argmin(sse)) + 1
    labels = np.zeros(n, np.int64)
    labels[order[split:]] = 1
    return labels


def _gaussian_params(x, resp, reg_covar):
    """sklearn's ``_estimate_gaussian_parameters`` for 1-D, full covariance: (nk, means, variances)."""
    nk = resp.sum(axis=0) + 10 * np.finfo(np.float64).eps
    means = (resp * x[:, None]).sum(axis=0) / nk
    variances = (resp * (x[:, None] - means) ** 2).sum(axis=0) / nk + reg_covar
    return nk, means, variances


def _weighted_log_prob(x, weights, means, variances):
    """``log w_k + log N(x; m_k, v_k)`` ([N, 2]) computed as sklearn does (through the precision Cholesky)."""
    prec_chol = 1.0 / np.sqrt(variances)
    y = x[:, None] * prec_chol - means * prec_chol
    return -0.5 * (np.log(2 * np.pi) + y ** 2) + np.log(prec_chol) + np.log(weights)


def _log_resp(x, weights, means, variances):
    wlp = _weighted_log_prob(x, weights, means, variances)
    top = wlp.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(wlp - top).sum(axis=1))
    return log_norm, wlp - log_norm[:, None]


def fit_gmm_1d(x, max_iter: int = RN50_DEFAULTS["gmm_max_iter"], tol: float = RN50_DEFAULTS["gmm_tol"],
               reg_covar: float = RN50_DEFAULTS["gmm_reg_covar"], *, init_labels=None, means_init=None) -> GMM1D:
    """EM for a two-component 1-D Gaussian mixture, step for step as sklearn's ``GaussianMixture``.

    Repo: joapr.py:648-649 ``GaussianMixture(n_components=2, max_iter=10, tol=1e-2, reg_covar=5e-4).fit(input_loss)``
    (defaults otherwise: full covariance, ``n_init=1``, ``init_params='kmeans'``, ``random_state=None``).
    Replicated: the initial parameters from hard k-means labels (``nk = counts + 10 eps``, weights ``nk / N``,
    variances with ``reg_covar``), then up to ``max_iter`` rounds of E-step, M-step (weights renormalized), stopping
    when the mean log-likelihood of the E-step changes by less than ``tol`` (sklearn's lower bound is the one of
    the parameters *before* that round's M-step); the returned parameters are the last M-step's.

    Initialisation: ``init_labels`` (0/1 per example, e.g. sklearn ``KMeans`` labels) if given, else
    :func:`two_means_labels` (deterministic; see there how it relates to sklearn's random k-means++).
    ``means_init`` overrides the initial means only, as sklearn's ``means_init`` does (weights and variances still
    come from the k-means labels). Component order: the label order (component 0 = lower k-means cluster for the
    default init); sklearn's order is that of its k-means labels, arbitrary. Needs two distinct values.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size < 2 or not np.all(np.isfinite(x)):
        raise ValueError("x must hold at least two finite numbers")
    labels = two_means_labels(x) if init_labels is None else np.asarray(init_labels).reshape(-1).astype(np.int64)
    if labels.shape != x.shape or not np.isin(labels, (0, 1)).all():
        raise ValueError("init_labels must be 0/1 per example")
    resp = np.stack([labels == 0, labels == 1], axis=1).astype(np.float64)
    nk, means, variances = _gaussian_params(x, resp, reg_covar)
    weights = nk / x.size
    if means_init is not None:
        means = np.asarray(means_init, np.float64).reshape(2)
    lower_bound, converged, n_iter = -np.inf, False, 0
    for n_iter in range(1, int(max_iter) + 1):
        prev = lower_bound
        log_norm, log_resp = _log_resp(x, weights, means, variances)
        nk, means, variances = _gaussian_params(x, np.exp(log_resp), reg_covar)
        weights = nk / nk.sum()
        lower_bound = float(log_norm.mean())
        if abs(lower_bound - prev) < tol:
            converged = True
            break
    return GMM1D(weights, means, variances, n_iter, converged, lower_bound)


def gmm_posteriors(x, gmm: GMM1D) -> np.ndarray:
    """``predict_proba``: the posterior of each component ([N, 2])."""
    x = np.asarray(x, np.float64).reshape(-1)
    return np.exp(_log_resp(x, gmm.weights, gmm.means, gmm.variances)[1])


def clean_probability(x, gmm: GMM1D) -> np.ndarray:
    """Posterior of the lower-mean ("clean") component ([N]).

    Repo: joapr.py:650-653, 672: ``prob = gmm.predict_proba(input_loss)``; ``idx_clean = mean.argmin()``;
    ``prob = prob[:, idx_clean]``.
    """
    return gmm_posteriors(x, gmm)[:, int(np.argmin(gmm.means))]


def joapr_intersection_threshold(gmm: GMM1D) -> float:
    """The repo's loss threshold (nan when its discriminant is negative), reproduced exactly.

    Repo: joapr.py:651-666. With ``c``/``n`` the lower-/higher-mean components, ``s = gmm.covariances_`` (named
    ``std`` but the *variances*):
    ``A = s_n^2 - s_c^2``, ``B = 2 (m_n s_c^2 - m_c s_n^2)``,
    ``C = (m_c s_n)^2 - (m_n s_c)^2 + 2 (s_n s_c)^2 log(2 s_c / s_n + 1e-8)``, ``E = B^2 - 4 A C``,
    ``thres = (-B + sqrt(E)) / (2 A + 1e-10)``.
    Up to the 1e-8 / 1e-10 guards this is the point where ``N(x; m_c, sd=s_c) = 2 N(x; m_n, sd=s_n)``: the
    crossing of two Gaussians that use the variances as standard deviations, ignore the mixture weights, and
    carry a factor 2 on the clean side (the ``2 *`` inside the log). The ``+`` root is the larger one when
    ``s_n > s_c``. Compare :func:`gaussian_intersection`, the crossing of the weighted mixture components.
    """
    means, s = np.asarray(gmm.means, np.float64), np.asarray(gmm.variances, np.float64)
    c, n = int(np.argmin(means)), int(np.argmax(means))
    m_c, m_n, s_c, s_n = means[c], means[n], s[c], s[n]
    a = s_n ** 2 - s_c ** 2
    b = 2 * (m_n * s_c ** 2 - m_c * s_n ** 2)
    cc = (m_c * s_n) ** 2 - (m_n * s_c) ** 2 + 2 * (s_n * s_c) ** 2 * np.log(2 * s_c / s_n + 1e-8)
    e = b ** 2 - 4 * a * cc
    with np.errstate(invalid="ignore"):
        return float((-b + np.sqrt(e)) / (2 * a + 1e-10))


def gaussian_intersection(gmm: GMM1D) -> float:
    """Where the two *weighted* components cross between their means: ``w_c N(x; m_c, v_c) = w_n N(x; m_n, v_n)``.

    This is the point where the clean posterior is exactly 0.5. Closed form: with ``c``/``n`` the lower-/higher-
    mean components, ``a x^2 + b x + c0 = 0`` with ``a = v_n - v_c``, ``b = 2 (v_c m_n - v_n m_c)``,
    ``c0 = v_n m_c^2 - v_c m_n^2 + v_c v_n (log(v_c / v_n) - 2 log(w_c / w_n))``; the root in ``[m_c, m_n]`` is
    returned, nan if neither root lies there (one weighted density above the other all the way between the means).
    Not the repo's rule (see :func:`joapr_intersection_threshold`); offered as the textbook version of it.
    """
    w = np.asarray(gmm.weights, np.float64)
    means, v = np.asarray(gmm.means, np.float64), np.asarray(gmm.variances, np.float64)
    c, n = int(np.argmin(means)), int(np.argmax(means))
    m_c, m_n, v_c, v_n, w_c, w_n = means[c], means[n], v[c], v[n], w[c], w[n]
    if c == n or not m_n > m_c:
        return float("nan")
    a = v_n - v_c
    b = 2 * (v_c * m_n - v_n * m_c)
    c0 = v_n * m_c ** 2 - v_c * m_n ** 2 + v_c * v_n * (np.log(v_c / v_n) - 2 * np.log(w_c / w_n))
    if abs(a) <= 1e-12 * max(v_c, v_n):  # equal variances: the equation is linear
        roots = [-c0 / b]
    else:
        disc = b * b - 4 * a * c0
        if disc < 0:
            return float("nan")
        q = -0.5 * (b + math.copysign(math.sqrt(disc), b))  # stable: no cancellation
        roots = [q / a] + ([c0 / q] if q != 0 else [])
    inside = [r for r in roots if m_c <= r <= m_n]
    if not inside:
        return float("nan")
    return float(min(inside, key=lambda r: abs(r - 0.5 * (m_c + m_n))))


def noise_rate_threshold(clean_prob, prev_threshold: float, n_total: int | None = None) -> float:
    """The repo's second threshold: the noise rate estimated with the previous epoch's threshold.

    Repo: joapr.py:674-676: ``pred_2 = prob > self.thres``;
    ``noise_rate = (K * NUM_SHOTS - count_nonzero(pred_2)) / (K * NUM_SHOTS)``; ``self.thres = noise_rate``.
    ``self.thres`` starts at 0.5 (joapr.py:244) and carries over epochs, so the trainer must keep (and checkpoint)
    the returned value and pass it back next epoch. ``n_total`` is the repo's ``K * NUM_SHOTS``; it defaults to
    ``len(clean_prob)``, which is the same number for the repo's few-shot sets (exactly ``NUM_SHOTS`` per class).
    """
    p = np.asarray(clean_prob, np.float64).reshape(-1)
    n = p.size if n_total is None else int(n_total)
    return float((n - np.count_nonzero(p > prev_threshold)) / n)


class Partition(NamedTuple):
    clean: np.ndarray  # [N] bool: the examples trained as labeled ("clean") this epoch
    clean_prob: np.ndarray  # [N] GMM posterior of the clean component
    prob_threshold: float  # the new noise-rate threshold (carry it to the next epoch)
    loss_threshold: float  # the Gaussian-crossing threshold on the averaged loss (nan: rule selects nothing)
    gmm: GMM1D | None


def partition(avg_loss, prev_threshold: float = RN50_DEFAULTS["initial_prob_threshold"], *,
              n_total: int | None = None, max_iter: int = RN50_DEFAULTS["gmm_max_iter"],
              tol: float = RN50_DEFAULTS["gmm_tol"], reg_covar: float = RN50_DEFAULTS["gmm_reg_covar"],
              loss_rule: str = "joapr", init_labels=None) -> Partition:
    """Clean/noisy split of the training set from its averaged normalized losses ([N]).

    Repo: joapr.py:647-678: fit the mixture (:func:`fit_gmm_1d`); ``pred_1 = input_loss < thres`` with the
    Gaussian-crossing threshold; ``pred_2 = prob > noise_rate`` with :func:`noise_rate_threshold`;
    clean = ``pred_1 OR pred_2``. A nan crossing makes ``pred_1`` all False, as in the repo.
    ``loss_rule="joapr"`` uses :func:`joapr_intersection_threshold` (the repo's formula), ``"weighted"``
    :func:`gaussian_intersection` (a deviation, off by default).
    Deviation: losses with fewer than two distinct values (the repo would crash on NaN) mark every example clean
    with probability 1.
    """
    x = np.asarray(avg_loss, np.float64).reshape(-1)
    if loss_rule not in ("joapr", "weighted"):
        raise ValueError(f"loss_rule must be 'joapr' or 'weighted', got {loss_rule!r}")
    if np.unique(x).size < 2:
        ones = np.ones_like(x)
        return Partition(np.ones(x.shape, bool), ones, noise_rate_threshold(ones, prev_threshold, n_total),
                         float("nan"), None)
    gmm = fit_gmm_1d(x, max_iter, tol, reg_covar, init_labels=init_labels)
    prob = clean_probability(x, gmm)
    loss_thr = joapr_intersection_threshold(gmm) if loss_rule == "joapr" else gaussian_intersection(gmm)
    prob_thr = noise_rate_threshold(prob, prev_threshold, n_total)
    clean = (x < loss_thr) | (prob > prob_thr)
    return Partition(clean, prob, prob_thr, loss_thr, gmm)


def refinement_weights(clean_prob, label_prob=None) -> np.ndarray:
    """Per-example weight ``w`` of the given label in :func:`refine_labels` ([N]).

    Repo: joapr.py:680-683: in the first epoch after warm-up (``self.epoch <= self.warmup_epoch``) ``w`` is the
    clean probability; afterwards ``prob.T * self.prob_output``, i.e. the clean probability times the model's
    probability of the given label on the unaugmented image (``predict[i][lab]``, joapr.py:624-626), from the same
    scoring pass. The dataset keeps ``w`` of the clean examples only (datasets/*.py ``probability_x``).
    Deviation: the repo collects ``prob_output`` in loader order, and that loader samples randomly
    (``Dataloader_eval`` uses ``DATALOADER.TRAIN_X.SAMPLER``, Dassl's default ``RandomSampler``) while ``prob`` is
    in dataset order, so its product pairs unrelated examples; here ``label_prob`` must be aligned with
    ``clean_prob`` (pass None for the first epoch after warm-up).
    """
    w = np.asarray(clean_prob, np.float64)
    return w if label_prob is None else w * np.asarray(label_prob, np.float64)


# ------------------------------------------------------------------------------ training step (JAX)


def sharpen(p, temperature: float = RN50_DEFAULTS["temperature"]) -> jax.Array:
    """``p^T / sum_k p_k^T`` along the last axis (float32).

    Repo: Dassl ``sharpen_prob`` (dassl/modeling/ops/utils.py:5-13): ``p = p.pow(temperature); p / p.sum(1)``.
    Note the exponent is ``T`` (TEMP = 2), not ``1 / T`` as in MixMatch.
    """
    p = jnp.asarray(p).astype(jnp.float32) ** temperature
    return p / jnp.sum(p, axis=-1, keepdims=True)


def refine_labels(labels, probs, weights, temperature: float = RN50_DEFAULTS["temperature"]) -> jax.Array:
    """Refined soft targets of clean examples: ``sharpen(w y + (1 - w) p, T)`` ([B, K], float32).

    Repo: joapr.py:487-499 (under ``no_grad``): ``label_x = w_x * onehot + (1 - w_x) * output_x`` with ``output_x``
    the softmax on the augmented clean batch (averaged over ``K_TRANSFORMS`` views, 1 by default), then
    ``sharpen_prob(label_x, TEMP)``. ``labels`` are class indices [B] or one-hot [B, K]; ``weights`` [B] from
    :func:`refinement_weights`. No co-guessing (one network). Stop gradients through ``probs`` yourself.
    """
    probs = jnp.asarray(probs).astype(jnp.float32)
    labels = jnp.asarray(labels)
    y = jax.nn.one_hot(labels, probs.shape[-1], dtype=jnp.float32) if labels.ndim == probs.ndim - 1 \
        else labels.astype(jnp.float32)
    w = jnp.asarray(weights).astype(jnp.float32)[..., None]
    return sharpen(w * y + (1 - w) * probs, temperature)


def pseudo_labels(probs, temperature: float = RN50_DEFAULTS["temperature"]) -> jax.Array:
    """Targets of noisy examples: ``sharpen(p, T)`` of the model's own prediction ([B, K]).

    Repo: joapr.py:475-482: ``label_u = sharpen_prob(mean softmax over the augmented views, TEMP)``.
    """
    return sharpen(probs, temperature)


def sample_mixup_lambda(key, beta: float = RN50_DEFAULTS["beta"]) -> jax.Array:
    """``max(l, 1 - l)`` with ``l ~ Beta(beta, beta)`` (scalar float32).

    Repo: joapr.py:505-506 ``l = np.random.beta(self.beta, self.beta); l = max(l, 1 - l)``. With the default
    ``beta = 0.001`` the mass sits at the ends, so ``lam`` is almost always within ~1e-3 of 1.
    """
    lam = jax.random.beta(key, beta, beta, dtype=jnp.float32)
    return jnp.maximum(lam, 1 - lam)


def mixup(x, y, lam, perm) -> tuple[jax.Array, jax.Array]:
    """``(lam x + (1 - lam) x[perm], lam y + (1 - lam) y[perm])``.

    Repo: joapr.py:507-514: one ``lam`` and one ``torch.randperm`` for the concatenation of the clean and the noisy
    batch (images and soft targets). ``x`` is mixed in its own dtype (images in the repo; the trainer decides what
    to mix), ``y`` in float32.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"mixup needs float inputs, got {x.dtype}")
    y = jnp.asarray(y).astype(jnp.float32)
    perm = jnp.asarray(perm)
    lam_x = jnp.asarray(lam).astype(x.dtype)
    lam_y = jnp.asarray(lam).astype(jnp.float32)
    return lam_x * x + (1 - lam_x) * x[perm], lam_y * y + (1 - lam_y) * y[perm]


def mixup_with_key(key, x, y, beta: float = RN50_DEFAULTS["beta"]):
    """:func:`mixup` with ``lam`` from :func:`sample_mixup_lambda` and a random permutation: (x, y, lam, perm)."""
    k_lam, k_perm = jax.random.split(key)
    lam = sample_mixup_lambda(k_lam, beta)
    perm = jax.random.permutation(k_perm, jnp.asarray(x).shape[0])
    mx, my = mixup(x, y, lam, perm)
    return mx, my, lam, perm


def soft_cross_entropy(logits, targets) -> jax.Array:
    """``-sum_k t_k log softmax(z)_k`` per example ([B], float32). Repo: joapr.py:518 (before its batch mean)."""
    return -jnp.sum(jnp.asarray(targets).astype(jnp.float32) * _log_probs(logits), axis=-1)


def mean_prediction(logits, mask=None) -> jax.Array:
    """Batch mean of the softmax ([K]); ``mask`` [B] (optional) leaves padding rows out."""
    p = jnp.exp(_log_probs(logits))
    if mask is None:
        return p.mean(axis=0)
    m = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(p * m[:, None], axis=0) / jnp.maximum(m.sum(), 1.0)


def uniform_prior_penalty(mean_probs) -> jax.Array:
    """``KL(uniform || mean prediction) = sum_k (1/K) log((1/K) / pbar_k)`` (scalar float32; 0 iff uniform).

    Repo: joapr.py:521-524: ``prior = ones(K) / K``; ``pred_mean = softmax(mixed_output).mean(0)``;
    ``penalty = sum(prior * log(prior / pred_mean))``.
    """
    pbar = jnp.asarray(mean_probs).astype(jnp.float32)
    k = pbar.shape[-1]
    return jnp.sum((1.0 / k) * (-jnp.log(float(k)) - jnp.log(pbar)), axis=-1)


def mixmatch_loss(logits, mixed_targets, alpha2: float = RN50_DEFAULTS["alpha2"], mask=None) -> jax.Array:
    """The post-warm-up loss ``mean soft CE + alpha2 * uniform_prior_penalty(mean prediction)`` (scalar).

    Repo: joapr.py:516-526 ``Lx = -mean(sum(log_softmax(mixed_output) * mixed_label))``; ``loss = Lx + ALPHA2 *
    penalty``: one soft CE over the mixed clean+noisy batch (no separate MSE term for the noisy part).
    ``mask`` [B] (optional) leaves padding rows out of both means.
    """
    ce = soft_cross_entropy(logits, mixed_targets)
    if mask is None:
        lx = ce.mean()
    else:
        m = jnp.asarray(mask).astype(jnp.float32)
        lx = jnp.sum(jnp.where(m > 0, ce, 0.0)) / jnp.maximum(m.sum(), 1.0)
    return lx + alpha2 * uniform_prior_penalty(mean_prediction(logits, mask))
