"""Prepares a dataset of the registry as tfds records: the one command every "not prepared" message gives.

  python -m dspt_jax.data.prepare dtd --data_dir=~/tensorflow_datasets
  python -m dspt_jax.data.prepare fgvc_aircraft --manual_dir=$DATA/fgvc_aircraft --data_dir=~/tensorflow_datasets
  python -m dspt_jax.data.prepare imagenet --manual_dir=<dir with ILSVRC2012_img_{train,val}.tar>

It calls the tfds builder's `download_and_prepare` directly (tfds' own `tfds build` command imports
apache_beam, which this project does not install). Datasets that tfds downloads need network: without it the
command stops within seconds and says so (tfds itself would retry for minutes); prepare them on a machine
with internet and copy the prepared folder into this machine's data_dir. Datasets read from files you
downloaded by hand (ImageNet, CIFAR-N annotations, CoOp's FGVC-Aircraft and UCF101 folders) take
`--manual_dir`, and never touch the network.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from urllib.parse import urlparse

from dspt_jax.data import datasets as ds_lib


class NoNetworkError(ConnectionError):
    """The dataset's download hosts cannot be reached from this machine."""


class ManualDirRequiredError(FileNotFoundError):
    """The dataset is built from files downloaded by hand, and no (existing) manual_dir was given."""


def _reachable(host: str, timeout: float) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` seconds, name lookup included (run in a
    thread, since a lookup with no resolver can block longer than any socket timeout)."""
    ok = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def download_hosts(builder) -> list[str]:
    """The hosts a tfds builder downloads from (from its registered checksums; empty when it has none)."""
    return sorted({urlparse(url).hostname for url in (builder.url_infos or {})} - {None})


def check_network(name: str, builder, timeout: float = 5.0) -> None:
    """Raises NoNetworkError, with the way out, when none of the builder's download hosts answers."""
    hosts = download_hosts(builder)
    if hosts and not any(_reachable(h, timeout) for h in hosts):
        raise NoNetworkError(
            f"Cannot reach {', '.join(hosts)} (where tfds downloads '{builder.name}' from) within {timeout:.0f} s: "
            f"this machine has no network for it. On a machine with internet run\n"
            f"  python -m dspt_jax.data.prepare {name} --data_dir=D\n"
            f"then copy D/{builder.name.split('/')[0]} into this machine's data_dir (see docs/DATA.md)."
        )


def needs_manual_dir(builder) -> bool:
    return bool(getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None))


def check_can_prepare(name: str, builder, manual_dir: str | None = None, *, probe_timeout: float = 5.0):
    """Raises ManualDirRequiredError or NoNetworkError (each saying what to do) when `builder` (of registry
    dataset `name`) cannot be prepared here; returns the manual_dir to prepare it from (None: download)."""
    info = ds_lib.get_dataset_info(name) if name in ds_lib.DATASETS else None
    if needs_manual_dir(builder):
        if not manual_dir or not os.path.isdir(os.path.expanduser(manual_dir)):
            what = "no --manual_dir was given" if not manual_dir else f"manual_dir {manual_dir} does not exist"
            hint = f"\n  {info.prepare.format(data_dir=builder.data_dir)}" if info else ""
            raise ManualDirRequiredError(
                f"'{name}' is built from files downloaded by hand, and {what}. What to put there:\n"
                f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}\n"
                f"Then run:{hint or ' the same command with --manual_dir'}"
            )
        return os.path.expanduser(manual_dir)
    check_network(name, builder, probe_timeout)
    return None


def prepare_builder(name: str, builder, manual_dir: str | None = None, *, probe_timeout: float = 5.0):
    """Prepares a tfds `builder` (of registry dataset `name`): from `manual_dir` when the builder reads
    hand-downloaded files, else by downloading after a quick network check. Returns the builder."""
    import tensorflow_datasets as tfds

    if builder.is_prepared():
        return builder
    manual_dir = check_can_prepare(name, builder, manual_dir, probe_timeout=probe_timeout)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP
        )
    )
    return builder


def prepare(dataset: str, manual_dir: str | None = None, data_dir: str | None = None, *, probe_timeout: float = 5.0):
    """Prepares registry dataset `dataset` (a name or alias of `dspt_jax.data.datasets`) in `data_dir`
    (None: $TFDS_DATA_DIR or ~/tensorflow_datasets); returns the tfds builder."""
    import tensorflow_datasets as tfds

    from dspt_jax.data import sources

    name = ds_lib.canonical_name(dataset)
    if name in ds_lib.OWN_DATA_NAMES:
        raise ValueError(f"'{name}' is your own data, read where it lies (data.folder / data.csv): nothing to prepare")
    info = ds_lib.get_dataset_info(name)
    if info.kind == "arrays":
        raise ValueError(f"'{name}' is an in-memory dataset: nothing to prepare")
    if info.kind == "food101n":
        raise ValueError(
            "food101n reads the Food-101N folders where they lie (data.folder) and Food-101's test split "
            "from tfds: prepare that with `python -m dspt_jax.data.prepare food101`"
        )
    if info.tfds_name.startswith("coop_"):
        from dspt_jax.data import builders  # noqa: F401  (registers the local builders)
    builder = tfds.builder(info.tfds_name, data_dir=sources.default_data_dir(data_dir))
    return prepare_builder(name, builder, manual_dir, probe_timeout=probe_timeout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help=f"one of {sorted(ds_lib.DATASETS)} (or a tfds alias)")
    parser.add_argument("--data_dir", default=None,
                        help="tfds data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    parser.add_argument("--manual_dir", default=None, help="the hand-downloaded files, for the datasets that need them")
    args = parser.parse_args(argv)
    try:
        builder = prepare(args.dataset, args.manual_dir, args.data_dir)
    except (NoNetworkError, ValueError, FileNotFoundError) as e:  # each says what to do
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"prepared {builder.name} in {builder.data_dir}: "
          + ", ".join(f"{k}={v.num_examples}" for k, v in builder.info.splits.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
