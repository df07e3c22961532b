"""Image features of a whole split, computed once: the training set's feature cache and evaluation's features.

CLIP's image tower is frozen, so an image's feature only depends on the pixels it is given. A run picks how
training images reach the loss with `config.image_features`:

  computed  the image tower runs on every training batch: a fresh random resized crop + flip of every image in
            every epoch. CoOp's protocol, the default; no cache.
  cached    every training image encoded once, with the test transform (resize + center crop), no
            augmentation. The image tower runs once per image instead of once per image per epoch.
  views:N   N augmented views (CoOp's training transform) of every training image encoded once; each epoch
            draws one of them per image (`pipeline.view_draws`). The image tower runs N times per image.

`cached` and `views:N` change the protocol (the augmentation is not CoOp's), and results.json says which mode a
run used. The features live in `<workdir>/features/train_<mode>.npz` beside the key that made them (model,
compute dtype, dataset, the training examples, image size, crop scale, views, seed); a resumed run reuses a
file whose key matches and recomputes any other.

Evaluation uses the same machinery: a split's features under the test transform are encoded once per run and
every evaluation (zero-shot, per-epoch, final) is a matrix product against the class features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zipfile
from typing import Callable, Iterable

import jax
import numpy as np

from dspt_jax import sharding

MODES = "computed | cached | views:N (N >= 1)"


@dataclasses.dataclass(frozen=True)
class FeatureMode:
    """`computed` (views 0), `cached` (views 1, test transform) or `views:N` (N augmented views)."""

    name: str
    views: int

    @property
    def cached(self) -> bool:
        return self.name != "computed"

    @property
    def augmented(self) -> bool:
        return self.name == "views"

    def __str__(self) -> str:
        return f"views:{self.views}" if self.augmented else self.name


def parse_mode(text: str) -> FeatureMode:
    """'computed' | 'cached' | 'views:N' -> FeatureMode; anything else is a ValueError naming the choices."""
    text = str(text).strip()
    if text in ("computed", "cached"):
        return FeatureMode(text, 0 if text == "computed" else 1)
    match = re.fullmatch(r"views:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return FeatureMode("views", int(match.group(1)))
    raise ValueError(f"config.image_features={text!r}; valid: {MODES}")


def encode_split(encode, params, batches: Iterable[dict], mesh) -> dict[str, np.ndarray]:
    """Runs the jitted `encode(params, images) -> features` over padded evaluation batches (each host its
    rows); returns the real rows of `features` [N, D], `label`, `clean_label` and `id`, whole on every host.

    Labels, ids and the mask travel as global arrays sharded like the images, so that gathering keeps every
    feature next to its own label whatever order the mesh puts the processes' devices in.
    """
    fields = ("label", "clean_label", "id", "mask")
    out: dict[str, list] = {k: [] for k in ("features",) + fields}
    for local in batches:
        local = {k: local[k] for k in ("image",) + fields}
        local["id"] = local["id"].astype(np.int32)  # without jax_enable_x64 the device keeps 32 bits anyway
        batch = sharding.to_global(local, mesh)
        out["features"].append(sharding.gather(encode(params, batch["image"])))
        for k in fields:
            out[k].append(sharding.gather(batch[k]))
    if not out["features"]:
        raise ValueError("the split to encode is empty")
    cat = {k: np.concatenate(v) for k, v in out.items()}
    keep = cat.pop("mask").astype(bool)
    return {k: v[keep] for k, v in cat.items()}


def cache_key(*, model: str, compute_dtype: str, dataset: str, ids: np.ndarray, image_size: int,
              crop_scale, mode: FeatureMode, seed: int) -> dict:
    """What the training features depend on. The seed only matters through the augmented views."""
    return {
        "model": model,
        "compute_dtype": compute_dtype,
        "dataset": dataset,
        "num_examples": int(len(ids)),
        "ids_sha1": hashlib.sha1(np.ascontiguousarray(ids, np.int64).tobytes()).hexdigest(),
        "image_size": int(image_size),
        "crop_scale": [float(x) for x in crop_scale] if mode.augmented else None,
        "mode": str(mode),
        "seed": int(seed) if mode.augmented else None,
    }


def cache_path(workdir: str, mode: FeatureMode) -> str:
    return os.path.join(workdir, "features", f"train_{str(mode).replace(':', '')}.npz")


def load_or_compute(path: str, key: dict, compute: Callable[[], np.ndarray], write: bool) -> tuple[np.ndarray, bool]:
    """The features saved at `path` if their key is `key`, else `compute()` (saved there when `write`).
    Returns (features, reused). An unreadable or truncated file is recomputed, never trusted."""
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) == key:
                    return np.asarray(f["features"]), True
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass
    features = compute()
    if write:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        with open(tmp, "wb") as f:
            np.savez(f, features=features, key=json.dumps(key, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return features, False


def predict(features: np.ndarray, class_features: np.ndarray, scale: float, chunk: int = 8192) -> np.ndarray:
    """argmax over classes of scale * cos(features, class_features), on the host in float32 (the same on
    every host: nothing here is a collective), in chunks of rows."""

    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    classes = unit(class_features).T
    out = [np.argmax(np.float32(scale) * unit(features[i : i + chunk]) @ classes, axis=-1)
           for i in range(0, len(features), chunk)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)
