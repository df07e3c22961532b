"""Prepares the local tfds builders (no network): CoOp's folder in, tfds records out.

  python -m dspt_jax.data.prepare fgvc_aircraft --manual_dir=$DATA/fgvc_aircraft --data_dir=~/tensorflow_datasets
  python -m dspt_jax.data.prepare ucf101 --manual_dir=$DATA/ucf101 --data_dir=~/tensorflow_datasets

The other datasets are prepared with tfds' own command (``tfds build <name> --data_dir=...``) on a
machine that can download them; see docs/DATA.md.
"""

from __future__ import annotations

import argparse
import os
import sys

LOCAL_BUILDERS = {"fgvc_aircraft": "coop_fgvc_aircraft", "ucf101": "coop_ucf101"}


def prepare(dataset: str, manual_dir: str, data_dir: str | None = None):
    """Builds ``dataset`` (a key of ``LOCAL_BUILDERS``) from ``manual_dir``; returns the builder."""
    if dataset not in LOCAL_BUILDERS:
        raise ValueError(f"unknown local dataset {dataset!r}; valid: {sorted(LOCAL_BUILDERS)}")
    manual_dir = os.path.expanduser(manual_dir)
    if not os.path.isdir(manual_dir):
        raise FileNotFoundError(f"manual_dir {manual_dir} does not exist")
    import tensorflow_datasets as tfds

    from dspt_jax.data import builders  # noqa: F401  (registers the builders)
    from dspt_jax.data import sources

    builder = tfds.builder(LOCAL_BUILDERS[dataset], data_dir=sources.default_data_dir(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return builder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(LOCAL_BUILDERS))
    parser.add_argument("--manual_dir", required=True, help="CoOp's folder of the dataset")
    parser.add_argument("--data_dir", default=None, help="tfds data_dir (default ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    builder = prepare(args.dataset, args.manual_dir, args.data_dir)
    print(f"prepared {builder.name} in {builder.data_dir}: "
          + ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
