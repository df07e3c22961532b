"""A tiny procedural image dataset for smoke runs and trainer tests (numpy only, instant, deterministic).

Each class is a (colour, shape) pair drawn on a noisy background at a random position and size, so the
classes are separable from pixels but not trivially identical images. It proves the training mechanics;
the synthetic world of `dspt_jax.data.synthetic` is the one meant for measuring accuracy.
"""

from __future__ import annotations

import numpy as np

from dspt_jax.data import datasets

NAME = "toy"
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 210),
}
_SHAPES = ("square", "disc")


def classnames(num_classes: int) -> list[str]:
    names = [f"{c} {s}" for s in _SHAPES for c in _COLOURS]
    if not 2 <= num_classes <= len(names):
        raise ValueError(f"toy dataset has 2..{len(names)} classes, asked for {num_classes}")
    return names[:num_classes]


def make_images(labels: np.ndarray, num_classes: int, image_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    names = classnames(num_classes)
    n = len(labels)
    images = rng.integers(60, 120, size=(n, image_size, image_size, 3)).astype(np.int16)
    yy, xx = np.mgrid[:image_size, :image_size]
    for i, label in enumerate(labels):
        colour, shape = names[label].split()
        r = rng.integers(image_size // 5, image_size // 3)
        cy, cx = rng.integers(r, image_size - r, size=2)
        if shape == "square":
            mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i][mask] = np.asarray(_COLOURS[colour]) + rng.integers(-20, 20, size=3)
    return np.clip(images, 0, 255).astype(np.uint8)


def register(
    num_classes: int = 4,
    train_per_class: int = 24,
    test_per_class: int = 10,
    image_size: int = 32,
    seed: int = 0,
    name: str = NAME,
) -> datasets.DatasetInfo:
    """Registers (or replaces) the toy dataset in the registry under `name`."""
    k = num_classes
    train_labels = np.repeat(np.arange(k), train_per_class)
    test_labels = np.repeat(np.arange(k), test_per_class)
    return datasets.register_array_dataset(
        name,
        classnames(k),
        train=(make_images(train_labels, k, image_size, seed), train_labels),
        test=(make_images(test_labels, k, image_size, seed + 1), test_labels),
        template="a photo of a {}.",
        overwrite=True,
    )
