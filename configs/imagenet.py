"""DSPT on ImageNet: CoOp's protocol (16 shots, ViT-B/16, 50 epochs, batch 32, seed 1).

CoOp trains ImageNet for 50 epochs at 16 shots (its *_ep50 configs).

Run:
  python -m dspt_jax.main --config=configs/imagenet.py --workdir=runs/imagenet
  python -m dspt_jax.main --config=configs/imagenet.py --workdir=runs/imagenet_ce_sym50 \\
      --config.loss=ce --config.noise.kind=sym --config.noise.rate=0.5 --config.seed=2

Data: docs/DATA.md says how to prepare ImageNet offline (and how to use CoOp's split file).
"""

from dspt_jax.config import default_config


def get_config():
    config = default_config()
    config.data.name = "imagenet"
    config.num_epochs = 50
    return config
