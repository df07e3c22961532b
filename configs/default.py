"""CoOp's defaults for DSPT prompt tuning (Caltech101, 16 shots, ViT-B/16, 200 epochs, batch 32).

Run:
  python -m dspt_jax.main --config=configs/default.py --workdir=runs/caltech_dspt \\
      --config.noise.kind=sym --config.noise.rate=0.5 --config.loss=dspt --config.seed=1

Every field can be overridden on the command line (`--config.prompt.n_ctx=4`, `--config.data.shots=8`, ...);
the fields and their meaning are in dspt_jax/config.py and dspt_jax/data/config.py.
"""

from dspt_jax.config import default_config


def get_config():
    return default_config()
