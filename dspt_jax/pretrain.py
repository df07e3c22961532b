"""Contrastive pretraining of a tiny CLIP on the synthetic world, cached in the Hugging Face layout.

The offline stand-in for "download openai/clip-vit-base-patch16": `ensure_pretrained_clip()` returns a
directory with `config.json` + `flax_model.msgpack` (what `save_clip` writes), trained here on first use and
reused afterwards; the trainer loads it through `load_clip(directory)` like any checkpoint, so the real
loading path runs. A config names it with `model.source = "synthetic"` (see `resolve_model_source`).

    python -m dspt_jax.pretrain                    # build (or find) the default checkpoint, print its path
    python -m dspt_jax.pretrain --eval             # ... and its zero-shot accuracy on the downstream task

Training: our own `CLIPModule` (ViT image tower on 32 px images, causal text tower with the real 49408-id
BPE vocabulary and 32 positions), CLIP's symmetric InfoNCE loss, AdamW (decoupled weight decay on matrices
only) with linear warmup and cosine decay, gradient clipping at global norm 1. Every batch is freshly
rendered from (recipe.seed, step) by `synthetic.pretraining_batch`, so there is no fixed pretraining set to
overfit and the run is deterministic.

Temperature: CoOp-style prompt tuning computes its logits with the checkpoint's exp(logit_scale), and every
released OpenAI CLIP ends its training at the cap, exp(logit_scale) = 100. This stand-in must match that
property of the checkpoints it replaces, so the default recipe holds the scale at 100 for the whole run
(`logit_scale=100`). Learning it from CLIP's init 1/0.07 (`logit_scale=0`) is kept as an option, but 1000
steps of this tiny model only take it from 14.3 to 21.9, a regime no real CLIP checkpoint is in. Measured on
2 CPU cores, default recipe otherwise: learned, final loss 1.32 and zero-shot 38.7%; fixed at 100, final
loss 1.19 and zero-shot 42.7% (30 classes, chance 3.3%).

Cache: `$DSPT_JAX_CACHE/synthetic_clip/<hash>/` (default `~/.cache/dspt_jax/...`). The hash covers every
field of the `PretrainRecipe`, this module's `VERSION` and the world's `synthetic.WORLD_VERSION`, so any
change rebuilds. The checkpoint is written into a temporary sibling directory and renamed into place only
when complete; an interrupted pretraining leaves no cache entry. A lock file makes concurrent processes (a
sweep) wait for one pretraining instead of each running its own. `recipe.json` beside the weights records
the recipe, the final loss and the wall time.

No TensorFlow here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dspt_jax import tokenizer as tok_lib
from dspt_jax.cache import cache_root
from dspt_jax.data import synthetic
from dspt_jax.data.config import CLIP_MEAN, CLIP_STD
from dspt_jax.models.clip import (
    CLIPConfig,
    CLIPModule,
    TextConfig,
    VisionConfig,
    l2_normalize,
)
from dspt_jax.models.loading import CLIP, init_clip, load_clip, save_clip

# Bump when this training code changes what a recipe produces (part of the cache hash).
VERSION = 2
SOURCE_PREFIX = "synthetic"
_WEIGHTS = ("config.json", "flax_model.msgpack")
_MAX_LOG_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
    """Everything that determines the pretrained weights (all of it enters the cache hash)."""

    seed: int = 0
    # Architecture: ViT on 32 px images in 8 px patches (16 tokens + class token), a causal text tower.
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32  # text positions of the model; CoOp prompts with n_ctx <= 16 fit
    caption_length: int = 24  # tokens per training caption (the longest caption is 24 with its SOT/EOT)
    embed_dim: int = 64
    # Optimization.
    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    # Temperature: > 0 holds exp(logit_scale) at this value for the whole run (default: CLIP's final 100);
    # 0 learns it from CLIP's init 1/0.07, capped at 100. See "Temperature" in the module docstring.
    logit_scale: float = 100.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"PretrainRecipe.{f.name} must be a number, got {value!r}")
        positive = (
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "text_width",
            "text_layers",
            "text_heads",
            "context_length",
            "caption_length",
            "embed_dim",
            "steps",
            "batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("vision_width / text_width must be multiples of vision_heads / text_heads")
        if not 2 <= self.caption_length <= self.context_length:
            raise ValueError(
                f"need 2 <= caption_length <= context_length, got {self.caption_length}, "
                f"{self.context_length}"
            )
        if self.batch_size < 2:
            raise ValueError(
                f"PretrainRecipe.batch_size must be >= 2 (InfoNCE needs negatives), got {self.batch_size}"
            )
        if not (self.logit_scale == 0 or 1.0 <= self.logit_scale <= 100.0):
            raise ValueError(
                f"PretrainRecipe.logit_scale must be 0 (learned) or in [1, 100] (fixed), got {self.logit_scale}"
            )
        if self.seed < 0 or self.warmup_steps < 0 or self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"need seed >= 0, warmup_steps >= 0, learning_rate > 0, weight_decay >= 0: {self}"
            )


# Named recipes for `model.source = "synthetic:<name>"`; "default" is what "synthetic" means.
RECIPES = {
    "default": PretrainRecipe(),
    # Seconds instead of minutes, for tests and smoke runs (the loss falls; zero-shot stays near chance).
    "small": PretrainRecipe(
        vision_width=32,
        vision_layers=1,
        vision_heads=2,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=32,
        steps=100,
        batch_size=32,
        learning_rate=5e-3,
        warmup_steps=10,
    ),
}


def clip_config(recipe: PretrainRecipe) -> CLIPConfig:
    """The tiny CLIP architecture of a recipe (OpenAI's layout, quick_gelu, real vocabulary)."""
    return CLIPConfig(
        text=TextConfig(
            hidden_size=recipe.text_width,
            intermediate_size=4 * recipe.text_width,
            num_hidden_layers=recipe.text_layers,
            num_attention_heads=recipe.text_heads,
            max_position_embeddings=recipe.context_length,
        ),
        vision=VisionConfig(
            hidden_size=recipe.vision_width,
            intermediate_size=4 * recipe.vision_width,
            num_hidden_layers=recipe.vision_layers,
            num_attention_heads=recipe.vision_heads,
            image_size=recipe.image_size,
            patch_size=recipe.patch_size,
        ),
        projection_dim=recipe.embed_dim,
        # A fixed temperature starts (and stays) at its value; a learned one at CLIP's log(1/0.07).
        **({"logit_scale_init_value": math.log(recipe.logit_scale)} if recipe.logit_scale else {}),
    )


def recipe_hash(recipe: PretrainRecipe) -> str:
    """16 hex digits over every recipe field, VERSION and the world's WORLD_VERSION."""
    payload = {
        "recipe": dataclasses.asdict(recipe),
        "version": VERSION,
        "world_version": synthetic.WORLD_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Training.


def contrastive_loss(image_features: jax.Array, text_features: jax.Array, log_scale: jax.Array) -> jax.Array:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies, where pair i
    of the batch is the positive of row i and every other pair a negative."""
    logits = jnp.exp(log_scale) * l2_normalize(image_features) @ l2_normalize(text_features).T
    labels = jnp.arange(logits.shape[0])
    i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (i2t + t2i)


def learning_rate(recipe: PretrainRecipe, step: int) -> float:
    """Linear warmup to recipe.learning_rate, then cosine decay to 0 at recipe.steps."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.learning_rate * (1 + math.cos(math.pi * min(1.0, progress)))


def normalize_images(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32, CLIP-normalized (the trainer's pipeline does the same)."""
    x = np.asarray(images, np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def _decay_mask(params) -> dict:
    # Decoupled weight decay on weight matrices only: no decay of biases, norms, embeddings, temperature.
    def wants(path, leaf):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return leaf.ndim >= 2 and name == "kernel"

    return jax.tree_util.tree_map_with_path(wants, params)


def adam_transform(grad_clip: float) -> optax.GradientTransformation:
    """Gradient clipping, then Adam's scaling (CLIP's beta2 0.98 and eps 1e-6); `adamw_apply` finishes."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam(b1=0.9, b2=0.98, eps=1e-6))


def adamw_apply(params, adam_updates, lr, weight_decay):
    """AdamW's step: p <- p - lr * (adam_update + wd * p), with decay only on weight matrices (the same
    rule as `optax.adamw(lr, weight_decay=wd, mask=...)`, with lr and wd as traced values so that one
    compilation serves every schedule). Keeps the temperature within CLIP's cap of 100."""
    mask = _decay_mask(params)
    params = jax.tree.map(
        lambda p, u, m: p - lr * (u + jnp.where(m, weight_decay, 0.0) * p), params, adam_updates, mask
    )
    return {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, _MAX_LOG_SCALE)}


@functools.lru_cache(maxsize=4)
def _compiled_step(
    config: CLIPConfig, grad_clip: float, learn_scale: bool
) -> tuple[Callable, optax.GradientTransformation]:
    """The jitted step of one architecture. Learning rate and weight decay are arguments, so recipes that
    differ only in schedule, seed or length share one compilation. With `learn_scale` False the temperature
    keeps its initial value (its gradient is dropped before clipping and Adam)."""
    module = CLIPModule(config)
    tx = adam_transform(grad_clip)

    def loss_fn(params, images, tokens):
        img = module.apply({"params": params}, images, method="encode_image")
        txt = module.apply({"params": params}, tokens, method="encode_text")
        return contrastive_loss(img, txt, params["logit_scale"])

    def step(params, opt_state, images, tokens, lr, weight_decay):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, tokens)
        if not learn_scale:
            grads = {**grads, "logit_scale": jnp.zeros_like(grads["logit_scale"])}
        updates, opt_state = tx.update(grads, opt_state, params)
        return adamw_apply(params, updates, lr, weight_decay), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), tx


@functools.lru_cache(maxsize=1 << 14)
def _word_ids(word: str) -> tuple[int, ...]:
    return tuple(tok_lib.get_tokenizer().encode(word))


def tokenize_captions(texts: list[str], context_length: int) -> np.ndarray:
    """`tokenizer.tokenize` for captions of lowercase words separated by single spaces, word by word.

    Same ids (CLIP's pre-tokenization never joins across a space, and the text cleanup leaves such
    captions unchanged) at a fraction of the cost: the cleanup runs once per distinct word, not per caption.
    """
    rows = np.zeros((len(texts), context_length), np.int32)
    for r, text in enumerate(texts):
        ids = [i for word in text.split(" ") for i in _word_ids(word)][: context_length - 2]
        rows[r, 0], rows[r, len(ids) + 1] = tok_lib.SOT_TOKEN, tok_lib.EOT_TOKEN
        rows[r, 1 : len(ids) + 1] = ids
    return rows


def _batch(recipe: PretrainRecipe, step: int) -> tuple[np.ndarray, np.ndarray]:
    images, texts = synthetic.pretraining_batch(recipe.seed, step, recipe.batch_size, recipe.image_size)
    return normalize_images(images), tokenize_captions(texts, recipe.caption_length)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def pretrain(
    recipe: PretrainRecipe | None = None, progress: bool = True, log_every_s: float = 5.0
) -> tuple[CLIP, dict]:
    """Trains a tiny CLIP from scratch; returns it (in memory) and {"losses": per step, "wall_time_s", ...}.

    Deterministic: the same recipe gives the same weights on the same machine and software.
    """
    recipe = recipe or RECIPES["default"]
    config = clip_config(recipe)
    clip = init_clip(config, rng=jax.random.key(recipe.seed))
    step_fn, tx = _compiled_step(config, float(recipe.grad_clip), not recipe.logit_scale)
    params = jax.tree.map(jnp.asarray, clip.params)
    opt_state = tx.init(params)
    losses = np.zeros(recipe.steps, np.float32)
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    say(
        f"Pretraining a tiny CLIP on the synthetic world: {recipe.steps} steps of {recipe.batch_size} "
        f"pairs (recipe {recipe_hash(recipe)})"
    )
    start = last_log = time.time()
    last_step, pending = 0, []
    # Render the next batches on a thread while the current step runs (numpy and XLA release the GIL).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(_batch, recipe, s) for s in range(min(2, recipe.steps))]
        for step in range(recipe.steps):
            images, tokens = ahead.pop(0).result()
            if step + 2 < recipe.steps:
                ahead.append(pool.submit(_batch, recipe, step + 2))
            params, opt_state, loss = step_fn(
                params,
                opt_state,
                images,
                tokens,
                jnp.float32(learning_rate(recipe, step)),
                jnp.float32(recipe.weight_decay),
            )
            pending.append(loss)
            now = time.time()
            if progress and (now - last_log >= log_every_s or step + 1 == recipe.steps):
                losses[last_step : step + 1] = jax.device_get(pending)
                rate = (step + 1 - last_step) / (now - last_log)
                say(
                    f"  step {step + 1}/{recipe.steps}  loss {losses[step]:.4f}  {rate:.2f} steps/s  "
                    f"ETA {_format_eta((recipe.steps - step - 1) / max(rate, 1e-9))}"
                )
                last_step, pending, last_log = step + 1, [], now
        losses[last_step:] = jax.device_get(pending)
    wall = time.time() - start
    clip = CLIP(config, jax.tree.map(np.asarray, jax.device_get(params)), source="pretrain")
    final = float(losses[-min(20, recipe.steps) :].mean())
    say(
        f"Pretraining done in {wall:.1f}s: final loss {final:.4f} (mean of the last 20 steps; "
        f"chance is log(batch) = {math.log(recipe.batch_size):.3f}), temperature scale {clip.logit_scale:.1f}"
    )
    history = {
        "losses": losses.tolist(),
        "final_loss": final,
        "wall_time_s": wall,
        "steps_per_s": recipe.steps / wall,
        "logit_scale": clip.logit_scale,
    }
    return clip, history


# ---------------------------------------------------------------------------------------------------------
# Cache.


def checkpoint_dir(recipe: PretrainRecipe | None = None, cache_dir: str | None = None) -> str:
    """Where the checkpoint of `recipe` lives (whether or not it exists yet)."""
    recipe = recipe or RECIPES["default"]
    return os.path.join(cache_dir or cache_root(), "synthetic_clip", recipe_hash(recipe))


def _complete(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in _WEIGHTS + ("recipe.json",))


@contextlib.contextmanager
def _lock(path: str):
    """An exclusive advisory lock on `path` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_pretrained_clip(
    recipe: PretrainRecipe | None = None, progress: bool = True, cache_dir: str | None = None
) -> str:
    """The directory of the pretrained tiny CLIP of `recipe` (default recipe if None), pretraining it
    first if the cache has no complete copy. Load it with `dspt_jax.models.loading.load_clip(directory)`.

    Args:
      recipe: a `PretrainRecipe`; None means `RECIPES["default"]`.
      progress: print progress (step, loss, steps/s, ETA) to stderr while pretraining.
      cache_dir: cache root instead of $DSPT_JAX_CACHE / ~/.cache/dspt_jax.
    """
    recipe = recipe or RECIPES["default"]
    if not isinstance(recipe, PretrainRecipe):
        raise ValueError(f"recipe must be a PretrainRecipe or None, got {recipe!r}")
    final = checkpoint_dir(recipe, cache_dir)
    if _complete(final):
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    with _lock(final + ".lock"):
        if _complete(final):  # another process finished it while we waited
            return final
        if os.path.exists(final):  # not written by us (renames are atomic): do not trust it
            if progress:
                print(f"{final} is incomplete; rebuilding it", file=sys.stderr, flush=True)
            shutil.rmtree(final)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
        try:
            clip, history = pretrain(recipe, progress=progress)
            save_clip(clip, tmp)
            info = {
                "recipe": dataclasses.asdict(recipe),
                "hash": recipe_hash(recipe),
                "version": VERSION,
                "world_version": synthetic.WORLD_VERSION,
                **{k: history[k] for k in ("final_loss", "wall_time_s", "steps_per_s", "logit_scale")},
                "losses": history["losses"],
            }
            with open(os.path.join(tmp, "recipe.json"), "w") as f:
                json.dump(info, f, indent=1)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is readable like any checkpoint
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if progress:
        print(f"Saved the pretrained tiny CLIP to {final}", file=sys.stderr, flush=True)
    return final


def recipe_from_source(source: str) -> PretrainRecipe:
    """ "synthetic" -> the default recipe; "synthetic:<name>" -> RECIPES[name]."""
    name = source.split(":", 1)[1] if ":" in source else "default"
    if source.split(":", 1)[0] != SOURCE_PREFIX or name not in RECIPES:
        raise ValueError(
            f"unknown synthetic CLIP source {source!r}; valid: "
            f"{[SOURCE_PREFIX] + [f'{SOURCE_PREFIX}:{n}' for n in RECIPES]}"
        )
    return RECIPES[name]


def resolve_model_source(source: str, progress: bool = True) -> str:
    """`config.model.source` -> what `load_clip` takes: "synthetic" (or "synthetic:<recipe>") becomes the
    cached checkpoint directory, pretrained first if needed; anything else is returned unchanged."""
    if isinstance(source, str) and (source == SOURCE_PREFIX or source.startswith(SOURCE_PREFIX + ":")):
        return ensure_pretrained_clip(recipe_from_source(source), progress=progress)
    return source


def load_pretrained_clip(
    recipe: PretrainRecipe | None = None,
    progress: bool = True,
    cache_dir: str | None = None,
    dtype=jnp.float32,
) -> CLIP:
    """`load_clip` of `ensure_pretrained_clip(...)`: the checkpoint as the trainer sees it."""
    return load_clip(ensure_pretrained_clip(recipe, progress, cache_dir), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Quick evaluation (no TensorFlow): zero-shot accuracy on the downstream test split.


def zero_shot_accuracy(
    clip: CLIP, images: np.ndarray, labels: np.ndarray, classnames, template: str, batch_size: int = 500
) -> float:
    """Accuracy of argmax_k cos(image, prompt_k) with prompts template.format(classname)."""
    text = l2_normalize(clip.encode_text(tok_lib.tokenize([template.format(c) for c in classnames])))
    preds = []
    for i in range(0, len(images), batch_size):
        feats = l2_normalize(clip.encode_image(normalize_images(images[i : i + batch_size])))
        preds.append(np.asarray(jnp.argmax(feats @ text.T, -1)))
    return float(np.mean(np.concatenate(preds) == np.asarray(labels)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--force", action="store_true", help="delete the cached copy and pretrain again")
    parser.add_argument(
        "--eval", action="store_true", help="print zero-shot accuracy on the downstream test split"
    )
    args = parser.parse_args(argv)
    recipe = RECIPES[args.recipe]
    if args.force and os.path.isdir(checkpoint_dir(recipe)):
        shutil.rmtree(checkpoint_dir(recipe))
    directory = ensure_pretrained_clip(recipe)
    print(directory)
    if args.eval:
        clip = load_clip(directory)
        images, labels = synthetic.make_split(50, 0, recipe.image_size, stream=2)  # = register()'s test split
        acc = zero_shot_accuracy(clip, images, labels, synthetic.classnames(), synthetic.DOWNSTREAM_TEMPLATE)
        print(
            f"zero-shot accuracy on the synthetic test split ({len(labels)} images, "
            f"{len(synthetic.classnames())} classes, chance {1 / len(synthetic.classnames()):.3f}): {acc:.4f}"
        )


if __name__ == "__main__":
    main()
