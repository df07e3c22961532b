"""The embedded demo: the offline synthetic world, zero-shot CLIP vs CoOp (CE) vs DSPT at 50% symmetric noise.

Run (no network, no downloads; 2.5 minutes on 2 CPU cores, 1.5 of them pretraining the tiny CLIP once; up to
7 on slower 2-core machines):
  python -m dspt_jax.main --config=configs/demo.py --workdir=runs/demo

What happens: a tiny CLIP is pretrained contrastively on the synthetic world's captioned images (cached in
~/.cache/dspt_jax/synthetic_clip/, reused afterwards) and loaded back through load_clip; the downstream task
(30 "colour shape" classes, 16 shots each, a camera shift from the pretraining images) gets 50% symmetric
label noise; CoOp's prompt learner is trained once with cross-entropy and once with DSPT, CoOp's schedule.
The table printed at the end (and written to runs/demo/demo_table.md) gives zero-shot and each loss's
clean-test accuracy, macro-F1 and how many mislabeled training examples the tuned prompt fits.

Other settings: --config.noise.rate=0.25, --config.compare_losses='("ce","dspt","gce","mae")', --config.seed=2.
"""

from dspt_jax.config import default_config


def get_config():
    config = default_config()
    config.model.source = "synthetic"
    config.data.name = "synthetic"
    config.data.image_size = 32
    config.data.shots = 16
    config.data.crop_scale = (0.5, 1.0)  # 32 px images: CoOp's (0.08, 1) would crop to a few pixels
    config.noise.kind = "sym"
    config.noise.rate = 0.5
    config.compare_losses = ("ce", "dspt")
    config.num_epochs = 200
    config.batch_size = 32
    config.eval_batch_size = 250
    config.log_every_steps = 300
    config.checkpoint_every_steps = 1500
    return config
