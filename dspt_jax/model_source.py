"""Where a run's CLIP comes from: every form of `config.model.source`, resolved to loaded weights.

  * an OpenAI model name ("RN50", "ViT-B/16", ...), a checkpoint file, a local checkpoint directory or a
    Hugging Face hub id: `models.loading` reads it;
  * "random:<preset>": random weights with the shapes of `models.clip.PRESETS` (speed and memory checks);
  * "synthetic" or "synthetic:<recipe>": the offline synthetic world's tiny CLIP, pretrained on first use and
    cached (`pretrain`), then read back as a checkpoint directory.

This module sits above the loader and the pretraining, so that the loader knows nothing of the synthetic
world (and `pretrain`, which saves and loads checkpoints, can import the loader without a cycle).
"""

from __future__ import annotations

import jax.numpy as jnp

from dspt_jax.models import loading
from dspt_jax.models.loading import CLIP

SYNTHETIC = "synthetic"


def is_synthetic(source: str) -> bool:
    return source == SYNTHETIC or source.startswith(SYNTHETIC + ":")


def load_clip(source: str, *, dtype=jnp.float32, revision: str | None = None, cache_dir: str | None = None) -> CLIP:
    """`models.loading.load_clip`, plus "synthetic" sources (pretrained here on first use)."""
    if is_synthetic(source):
        from dspt_jax import pretrain  # pretraining code and the synthetic world: only when asked for

        return loading.load_clip(pretrain.resolve_model_source(source), dtype=dtype)
    return loading.load_clip(source, dtype=dtype, revision=revision, cache_dir=cache_dir)


def check_source(source: str, *, revision: str | None = None, cache_dir: str | None = None) -> None:
    """Raises what `load_clip(source)` would raise for a missing checkpoint, reading no weights. A synthetic
    source is always available (pretrained on first use)."""
    if not is_synthetic(source):
        loading.check_source(source, revision=revision, cache_dir=cache_dir)
