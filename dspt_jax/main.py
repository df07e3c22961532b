"""Command line: `python -m dspt_jax.main --config=configs/caltech.py --workdir=runs/caltech`.

Any config field can be overridden: `--config.noise.kind=sym --config.noise.rate=0.5 --config.loss=ce`.
On multi-host systems (TPU pods, multi-node GPU) pass --distributed to call jax.distributed.initialize().
Progress goes to stdout; absl/orbax messages below WARNING are hidden unless --verbosity is given.
"""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.json.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (TPU pods, "
    "SLURM/Open MPI clusters are detected; elsewhere give the three flags below).",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-node GPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-node GPU).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-node GPU).")
flags.mark_flags_as_required(["config", "workdir"])

log = logging.getLogger("dspt_jax")


def _setup_logging() -> None:
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    from dspt_jax.train import log_to_stdout

    log_to_stdout()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _setup_logging()
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    from dspt_jax import train

    log.info(
        "JAX %s, process %d/%d, devices: %s",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.devices(),
    )
    try:
        if _CONFIG.value.get("compare_losses"):  # configs/demo.py: several losses on one setting, one table
            from dspt_jax import demo

            demo.run_demo(_CONFIG.value, _WORKDIR.value)
        else:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.InputsNotFoundError as e:  # the message is the whole answer; a traceback would bury it
        print(f"\n{e}", file=sys.stderr)
        sys.exit(1)
    except train.TrainingInterrupted as e:  # Ctrl-C or SIGTERM: the trainer has said where its checkpoint is
        sys.exit(e.exit_status)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("Aborted (Ctrl-C); rerun with the same workdir to resume from its last checkpoint.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
