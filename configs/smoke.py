"""Smoke run: a tiny random CLIP on the in-memory toy dataset; the whole trainer end to end in seconds.

Proves the mechanics (data, prompt, jit step, checkpoints, evaluation, results), not accuracy.

Run:
  python -m dspt_jax.main --config=configs/smoke.py --workdir=/tmp/dspt_smoke
"""

from dspt_jax.config import default_config


def get_config():
    config = default_config()
    config.model.source = "random:tiny"
    config.data.name = "toy"
    config.data.image_size = 32
    config.data.shots = 8
    config.noise.kind = "sym"
    config.noise.rate = 0.25
    config.prompt.n_ctx = 4
    config.num_epochs = 3
    config.batch_size = 8
    config.eval_batch_size = 16
    config.log_every_steps = 2
    config.checkpoint_every_steps = 4
    return config
