"""A tiny CLIP for tests: CLIP's real vocabulary and layout at toy widths, with weights at a scale where
every one of them matters. Shared by test_clip.py and test_prompt.py."""

import jax
import numpy as np

from dspt_jax.models import CLIPConfig, TextConfig, VisionConfig, init_clip


def tiny_config(vocab_size=49408):
    return CLIPConfig(
        text=TextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
        vision=VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=16,
            patch_size=8,
        ),
        projection_dim=16,
    )


def scrambled_clip(config, seed):
    """A random CLIP whose every weight matters: kernels ~ N(0, 1/fan_in), LN scales ~ 1 + N(0, 0.1), biases
    and embeddings ~ N(0, 0.1..0.5). The default N(0, 0.02) init leaves tokens almost independent of each other,
    which would make the prompt-path oracles too weak to catch a misplaced context vector."""
    clip = init_clip(config, rng=seed)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(size=x.shape, scale=1 / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
        if name == "logit_scale":
            return x
        return (0.3 * rng.normal(size=x.shape)).astype(np.float32)

    clip.params = jax.tree_util.tree_map_with_path(draw, clip.params)
    return clip
