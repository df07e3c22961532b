"""The project's cache directory: $DSPT_JAX_CACHE, else ~/.cache/dspt_jax.

Holds what is expensive to rebuild and safe to share between runs: the pretrained tiny CLIPs of the
synthetic world (`synthetic_clip/`, see `dspt_jax.pretrain`) and the label columns of tfds splits
(`tfds_tables/`, see `dspt_jax.data.sources`). Deleting it is always safe. No TensorFlow, no JAX here.
"""

import os

ENV = "DSPT_JAX_CACHE"


def cache_root() -> str:
    """$DSPT_JAX_CACHE, else ~/.cache/dspt_jax."""
    return os.path.expanduser(os.environ.get(ENV) or os.path.join("~", ".cache", "dspt_jax"))
