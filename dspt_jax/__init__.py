"""dspt_jax: Double-Softmax Prompt Tuning (DSPT) of a frozen CLIP under label noise, in JAX/Flax."""

from dspt_jax.model_source import load_clip  # every config.model.source form, "synthetic" included
from dspt_jax.models.loading import CLIP
from dspt_jax.tokenizer import tokenize

__version__ = "0.1.0"
__all__ = ["CLIP", "load_clip", "tokenize", "__version__"]
