"""DSPT on SUN397: CoOp's protocol (16 shots, ViT-B/16, 200 epochs, batch 32, seed 1).

Run:
  python -m dspt_jax.main --config=configs/sun397.py --workdir=runs/sun397
  python -m dspt_jax.main --config=configs/sun397.py --workdir=runs/sun397_ce_sym50 \\
      --config.loss=ce --config.noise.kind=sym --config.noise.rate=0.5 --config.seed=2

Data: docs/DATA.md says how to prepare SUN397 offline (and how to use CoOp's split file).
"""

from dspt_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "sun397"
    return config
