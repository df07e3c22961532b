"""Image features of a whole split, computed once: the training set's feature cache and evaluation's features.

CLIP's image tower is frozen, so an image's feature only depends on the pixels it is given. A run picks how
training images reach the loss with `config.image_features`:

  computed  the image tower runs on every training batch: a fresh random resized crop + flip of every image in
            every epoch (the test transform with `data.augment=False`). CoOp's protocol, the default; no cache.
  cached    every training image encoded once, with the test transform (resize + center crop), no
            augmentation. The image tower runs once per image instead of once per image per epoch.
  views:N   N augmented views (CoOp's training transform) of every training image encoded once; each epoch
            draws one of them per image (`pipeline.view_draws`). The image tower runs N times per image.

`cached` and `views:N` change the protocol (the augmentation is not CoOp's), and results.json says which mode a
run used. The features live in `<workdir>/features/train_<mode>.npz` beside the key that made them (model and a
fingerprint of its weights, compute dtype, dataset, the training examples, image size, crop scale, views,
seed); a resumed run reuses a file whose key matches and recomputes any other.

Evaluation uses the same machinery: a split's features under the test transform are encoded once per run and
every evaluation (zero-shot, per-epoch, final) is a matrix product against the class features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zipfile
from typing import Iterable

import numpy as np

from dspt_jax import files, sharding

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


def weights_fingerprint(clip_params) -> str:
    """A hash of the image tower's first and last weights (ViT: projection and patch embedding; ResNet:
    attention pool output and stem convolution): a checkpoint replaced under the same path gets other
    features."""
    h = hashlib.sha1()
    tower = clip_params["vision_model"]
    if "visual_projection" in clip_params:
        leaves = (clip_params["visual_projection"]["kernel"], tower["embeddings"]["patch_embedding"]["kernel"])
    else:
        leaves = (tower["attnpool"]["c_proj"]["kernel"], tower["conv1"]["kernel"])
    for leaf in leaves:
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def cache_key(*, model: str, weights: str, compute_dtype: str, dataset: str, ids: np.ndarray,
              image_size: int, crop_scale, mode: FeatureMode, seed: int) -> dict:
    """What the training features depend on. The seed only matters through the augmented views."""
    return {
        "version": 1,  # of the image transforms; bump when they change
        "model": model,
        "weights_sha1": weights,
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
    return files.join(workdir, "features", f"train_{str(mode).replace(':', '')}.npz")


def load(path: str, key: dict) -> np.ndarray | None:
    """The features saved at `path` if they were made with `key`; None for a missing, other-key, unreadable or
    truncated file (never trusted, always recomputed)."""
    if not files.exists(path):
        return None
    try:
        saved = files.read_npz(path)
        if json.loads(str(saved["key"])) == key:
            return saved["features"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        pass
    return None


def save(path: str, key: dict, features: np.ndarray) -> None:
    """Writes `features` with `key` atomically (`files.write_bytes`)."""
    files.write_npz(path, features=features, key=json.dumps(key, sort_keys=True))


def in_order(rows: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """`rows["features"]` reordered to follow `ids` (unique example ids). `encode_split` returns the rows of
    every global batch together, so with several hosts (each reading its own contiguous share of the split)
    they come back interleaved."""
    ids = np.asarray(ids, np.int64)
    got = rows["id"].astype(np.int64)
    order = np.argsort(got, kind="stable")
    where = np.searchsorted(got, ids, sorter=order).clip(0, len(got) - 1)
    perm = order[where]
    if len(got) != len(ids) or not np.array_equal(got[perm], ids):
        raise RuntimeError(f"encoded {len(got)} examples, not the {len(ids)} asked for")
    return rows["features"][perm]


def predict(features: np.ndarray, class_features: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """argmax over classes of cos(features, class_features) (the logit scale cannot change it), on the host in
    float32 (the same on every host: nothing here is a collective), in chunks of rows."""

    def unit(x):
        x = np.asarray(x, np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    classes = unit(class_features).T
    out = [np.argmax(unit(features[i : i + chunk]) @ classes, axis=-1)
           for i in range(0, len(features), chunk)]
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0,), np.int32)
