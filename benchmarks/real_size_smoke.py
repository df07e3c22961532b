"""Real-size smoke: ViT-B/16 shapes (random weights), 100 classes (Caltech101's CoOp names), CoOp's batch 32
and n_ctx 16, a few training steps through the real trainer; prints steps/s. No weights or data needed.

  python benchmarks/real_size_smoke.py --steps=5 [--dtype=bfloat16] [--image_features=cached]
      [--workdir=/tmp/real_size_smoke]

Unlike `python -m dspt_jax.bench` (the jitted step alone), this goes through the whole trainer, input pipeline
included, and reports the share of the training loop spent waiting for input.
"""

import argparse
import json
import os
import shutil
import time

import numpy as np

from dspt_jax import train
from dspt_jax.config import default_config
from dspt_jax.data import datasets


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--image_features", default="computed", help="computed | cached | views:N")
    parser.add_argument("--workdir", default="/tmp/real_size_smoke")
    args = parser.parse_args()
    train.log_to_stdout()

    names = datasets.get_dataset_info("caltech101").classnames
    k, per_class = len(names), 4
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(k), per_class)
    images = rng.integers(0, 256, size=(k * per_class, 224, 224, 3), dtype=np.uint8)
    datasets.register_array_dataset(
        "random_caltech_shapes", names, train=(images, labels), test=(images[:k], labels[:k]), overwrite=True
    )

    config = default_config()
    config.model.source = "random:vit_b16"
    config.model.compute_dtype = args.dtype
    config.image_features = args.image_features
    config.data.name = "random_caltech_shapes"
    config.data.shots = per_class
    config.batch_size = args.batch_size
    config.max_steps = args.steps
    config.log_every_steps = 1
    config.zero_shot = False
    config.eval_train = False
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.time()
    results = train.train_and_evaluate(config, args.workdir)
    lines = [json.loads(l) for l in open(os.path.join(args.workdir, "metrics.jsonl"))]
    steady = [l["steps_per_sec"] for l in lines[1:]]  # the first step includes compilation
    print(
        json.dumps(
            {
                "model": "ViT-B/16 shapes, random weights",
                "classes": k,
                "batch": args.batch_size,
                "n_ctx": 16,
                "dtype": args.dtype,
                "image_features": args.image_features,
                "input_wait_fraction": results["input_wait_fraction"],
                "steps": results["steps"],
                "first_step_s": 1 / lines[0]["steps_per_sec"],
                "steady_steps_per_sec": float(np.mean(steady)) if steady else None,
                "seconds_per_step": 1 / float(np.mean(steady)) if steady else None,
                "wall_time_s": time.time() - start,
                "test_examples": results["final"]["num_examples"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
