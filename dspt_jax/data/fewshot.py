"""Few-shot sampling (CoOp protocol) and the selection of the training labels, in pure numpy.

CoOp draws K images per class at random with a seed, keeps every image of a class that has fewer
than K, and samples validation with min(K, 4) per class; K = -1 means the whole split. The per-class
noise families (``symflip``, ``pairflip``) are sampling rules too: they pick images of other classes
and label them as the class being filled.

All functions see the global label table only; nothing depends on the process index or count, so
every host computes the same selection for a seed. Each function draws from its own random stream
(see ``noise.STREAMS``), so sampling and label noise never share draws. Must import without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dspt_jax.data import noise


def _check_shots(shots: Any, allow_all: bool = True) -> int:
    if isinstance(shots, (bool, np.bool_)) or not isinstance(shots, (int, np.integer)):
        raise ValueError(f"data.shots must be an integer (> 0, or -1 for all), got {shots!r}")
    shots = int(shots)
    if shots == -1 and allow_all:
        return shots
    if shots < 1:
        valid = "> 0 or -1 (all examples)" if allow_all else "> 0"
        raise ValueError(f"data.shots must be {valid}, got {shots}")
    return shots


def _class_pools(labels: np.ndarray, num_classes: int, usable: np.ndarray) -> list[np.ndarray]:
    """For each class, the increasing indices of its usable examples (one sort, not K scans)."""
    idx = np.flatnonzero(usable)
    lab = labels[idx]
    order = np.argsort(lab, kind="stable")  # stable: indices stay increasing within a class
    bounds = np.searchsorted(lab[order], np.arange(num_classes + 1))
    return [idx[order[bounds[c] : bounds[c + 1]]] for c in range(num_classes)]


def _draw_per_class(
    labels: np.ndarray, per_class: int, num_classes: int, rng: np.random.Generator, usable: np.ndarray
) -> np.ndarray:
    """min(per_class, available) indices of each class among ``usable``, drawn without replacement."""
    chosen = [np.zeros((0,), np.int64)]
    for pool in _class_pools(labels, num_classes, usable):  # fixed class order: reproducible draws
        take = min(per_class, pool.size)
        if take:
            chosen.append(rng.choice(pool, size=take, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def sample_few_shot(labels: Any, shots: int, seed: int, num_classes: int | None = None) -> np.ndarray:
    """Sorted int64 indices into ``labels``: ``shots`` random examples per class (CoOp few-shot).

    Classes with fewer than ``shots`` examples keep all of theirs; ``shots == -1`` returns every index.
    ``num_classes`` is inferred from the labels when None and checked against them when given.
    """
    labels = noise.as_label_array(labels)
    num_classes = noise.resolve_num_classes(labels, num_classes)
    shots = _check_shots(shots)
    rng = noise.rng_for(seed, "fewshot")
    if shots == -1:
        return np.arange(labels.shape[0], dtype=np.int64)
    return _draw_per_class(labels, shots, num_classes, rng, np.ones(labels.shape, bool))


def sample_validation(
    labels: Any,
    shots: int,
    seed: int,
    exclude: Any = None,
    num_classes: int | None = None,
) -> np.ndarray:
    """Sorted int64 indices of a validation set: min(shots, 4) per class, none of them in ``exclude``.

    ``labels`` is the table the validation set is drawn from (the split's own validation table, or
    the training table with ``exclude`` = the training indices when there is no validation split).
    ``shots == -1`` keeps every example not excluded, as CoOp keeps the full validation split then.
    """
    labels = noise.as_label_array(labels)
    num_classes = noise.resolve_num_classes(labels, num_classes)
    shots = _check_shots(shots)
    rng = noise.rng_for(seed, "validation")
    usable = np.ones(labels.shape, bool)
    if exclude is not None:
        exclude = noise.as_label_array(exclude, "exclude")
        if exclude.size and exclude.max() >= labels.shape[0]:
            raise ValueError(f"exclude holds index {exclude.max()} past the {labels.shape[0]} labels")
        usable[exclude] = False
    if shots == -1:
        return np.flatnonzero(usable).astype(np.int64)
    return _draw_per_class(labels, min(shots, 4), num_classes, rng, usable)


def sample_per_class_flips(
    labels: Any,
    shots: int,
    num_flips: int,
    kind: str,
    seed: int,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class noisy few-shot sampling: each class gets exactly ``num_flips`` foreign images.

    For every class c the training set holds ``shots - F`` images of c (all of them if c has fewer)
    and exactly F images of other classes labelled c:
      * ``symflip``: each foreign image comes from a class drawn uniformly among the other classes
        that still have unused images (PTNL, JoAPR);
      * ``pairflip``: all F come from class (c + 1) % K (JoAPR).
    Clean images are reserved first for every class, then the foreign ones are drawn from what is
    left, so an image is used at most once overall.

    Returns:
      (indices int64 [M] sorted, noisy int64 [M] the labels to train on, flipped bool [M]);
      the clean labels are ``labels[indices]`` and ``flipped == (noisy != labels[indices])``.

    Raises:
      ValueError: bad kind/shots/F, or too few unused images to place F foreign images.
    """
    labels = noise.as_label_array(labels)
    num_classes = noise.resolve_num_classes(labels, num_classes)
    shots = _check_shots(shots, allow_all=False)
    if kind not in noise.PER_CLASS_KINDS:
        raise ValueError(f"unknown per-class noise kind {kind!r}; valid: {noise.PER_CLASS_KINDS}")
    if isinstance(num_flips, (bool, np.bool_)) or not isinstance(num_flips, (int, np.integer)):
        raise ValueError(f"noise.num_flips must be an integer in [0, data.shots], got {num_flips!r}")
    num_flips = int(num_flips)
    if not 0 <= num_flips <= shots:
        raise ValueError(
            f"noise.num_flips must be in [0, data.shots={shots}] (the foreign images among a class's "
            f"{shots} shots), got {num_flips}: lower noise.num_flips or raise data.shots"
        )
    rng = noise.rng_for(seed, "per_class_flips")

    # Each class's images in a random order; a class's queue is consumed from the front.
    pools = _class_pools(labels, num_classes, np.ones(labels.shape, bool))
    queues = [rng.permutation(pool) for pool in pools]
    heads = np.zeros(num_classes, np.int64)
    picked, assigned = [], []
    for c in range(num_classes):
        take = min(shots - num_flips, queues[c].size)
        picked.append(queues[c][:take])
        assigned.append(np.full(take, c, np.int64))
        heads[c] = take

    remaining = np.array([q.size for q in queues], np.int64) - heads
    for c in range(num_classes):
        for _ in range(num_flips):
            if kind == "pairflip":
                src = (c + 1) % num_classes
                if remaining[src] == 0:
                    raise ValueError(
                        f"pairflip: class {src} has no unused image left to label as class {c} "
                        f"({queues[src].size} images, data.shots={shots}, noise.num_flips={num_flips}); "
                        "lower data.shots or noise.num_flips (or noise.rate)"
                    )
            else:
                others = np.flatnonzero(remaining > 0)
                others = others[others != c]
                if others.size == 0:
                    raise ValueError(
                        f"symflip: no unused image of another class left to label as class {c} "
                        f"(data.shots={shots}, noise.num_flips={num_flips}); lower data.shots or "
                        "noise.num_flips (or noise.rate)"
                    )
                src = int(rng.choice(others))
            picked.append(queues[src][heads[src] : heads[src] + 1])
            assigned.append(np.array([c], np.int64))
            heads[src] += 1
            remaining[src] -= 1

    indices = np.concatenate(picked).astype(np.int64) if picked else np.zeros((0,), np.int64)
    noisy = np.concatenate(assigned) if assigned else np.zeros((0,), np.int64)
    order = np.argsort(indices, kind="stable")
    indices, noisy = indices[order], noisy[order]
    return indices, noisy, noisy != labels[indices]


def flips_for(spec: noise.NoiseSpec, shots: int) -> int:
    """F, the foreign images per class of a per-class kind (``symflip`` / ``pairflip``) at ``shots`` shots;
    raises ValueError, naming the config fields, for a setting that cannot be drawn from any data: shots -1,
    F > shots, or ``num_flips`` disagreeing with ``rate``."""
    if shots == -1:
        raise ValueError(
            f"noise.kind={spec.kind!r} puts a fixed number of foreign images among each class's shots, so "
            "it needs data.shots > 0, not -1 (the whole training split)"
        )
    shots = _check_shots(shots, allow_all=False)
    flips = spec.flips_per_class(shots)
    if flips > shots:
        raise ValueError(
            f"noise.num_flips must be in [0, data.shots={shots}] (the foreign images among a class's "
            f"{shots} shots), got {flips}: lower noise.num_flips or raise data.shots"
        )
    return flips


@dataclasses.dataclass
class TrainSelection:
    """The training examples and their labels.

    Attributes:
      indices: int64 [M], positions in the split's label table, sorted.
      clean: int64 [M], the true labels (-1 where unknown, for real-noise data without clean labels).
      noisy: int64 [M], the labels to train on.
      flipped: bool [M], ``noisy != clean`` where clean is known, False elsewhere.
    """

    indices: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray
    flipped: np.ndarray


def select_train(
    labels: Any,
    num_classes: int | None,
    shots: int,
    spec: noise.NoiseSpec,
    seed: int,
    noisy_labels: Any = None,
) -> TrainSelection:
    """The single entry point of the pipeline: few-shot sampling plus the noise of ``spec``.

    * "none": few-shot sample, clean labels.
    * "sym", "asym", "sym_incl": few-shot sample, then ``noise.corrupt_labels`` on its labels. The
      sample is the same as with "none" for the same seed (noise uses another random stream), so
      runs at different noise levels train on the same images.
    * "symflip", "pairflip": ``sample_per_class_flips`` with F = ``spec.flips_per_class(shots)``.
    * "matrix": few-shot sample, then ``noise.corrupt_with_matrix``.
    * "real": ``noisy_labels`` (the dataset's own) are the training labels and the few-shot sample is
      drawn by them; ``labels`` are the clean labels where known (-1 entries or None if unknown).
      No synthetic noise is added.

    ``noisy_labels`` is only accepted with kind "real", so real noise is never silently mixed with,
    or replaced by, synthetic noise.
    """
    if not isinstance(spec, noise.NoiseSpec):
        raise ValueError(f"spec must be a noise.NoiseSpec, got {type(spec).__name__}")
    spec.validate()
    seed = noise.check_seed(seed)

    if spec.kind == "real":
        if noisy_labels is None:
            raise ValueError("kind 'real' needs the dataset's noisy_labels")
        train_labels = noise.as_label_array(noisy_labels, "noisy_labels")
        num_classes = noise.resolve_num_classes(train_labels, num_classes, "noisy_labels")
        if labels is None:
            clean_all = np.full(train_labels.shape, -1, np.int64)
        else:
            clean_all = noise.as_label_array(labels, allow_unknown=True)
            if clean_all.shape != train_labels.shape:
                raise ValueError(
                    f"labels and noisy_labels differ in shape: {clean_all.shape} vs {train_labels.shape}"
                )
            noise.resolve_num_classes(clean_all, num_classes)
        idx = sample_few_shot(train_labels, shots, seed, num_classes)
        clean, noisy = clean_all[idx], train_labels[idx]
        return TrainSelection(idx, clean, noisy, (clean >= 0) & (noisy != clean))

    if noisy_labels is not None:
        raise ValueError(
            f"noisy_labels are only used with kind 'real', got kind {spec.kind!r}; "
            "synthetic noise is applied to the clean labels"
        )
    labels = noise.as_label_array(labels)
    num_classes = noise.resolve_num_classes(labels, num_classes)

    if spec.kind in noise.PER_CLASS_KINDS:
        flips = flips_for(spec, shots)
        idx, noisy, flipped = sample_per_class_flips(labels, shots, flips, spec.kind, seed, num_classes)
        return TrainSelection(idx, labels[idx], noisy, flipped)

    idx = sample_few_shot(labels, shots, seed, num_classes)
    clean = labels[idx]
    if spec.kind == "none":
        noisy, flipped = clean.copy(), np.zeros(clean.shape, bool)
    elif spec.kind == "matrix":
        if spec.transition_matrix().shape[0] != num_classes:
            raise ValueError(
                f"noise.transition is {spec.transition_matrix().shape[0]}x{spec.transition_matrix().shape[0]}"
                f" but the dataset has {num_classes} classes: give a {num_classes} x {num_classes} matrix"
            )
        noisy, flipped = noise.corrupt_with_matrix(clean, spec.transition_matrix(), seed)
    else:
        noisy, flipped = noise.corrupt_labels(clean, num_classes, spec.kind, spec.rate, seed)
    return TrainSelection(idx, clean, noisy, flipped)


__all__ = (
    "sample_few_shot",
    "sample_validation",
    "sample_per_class_flips",
    "flips_for",
    "TrainSelection",
    "select_train",
)
