"""Command line: `python -m dspt_jax.main --config=configs/caltech.py --workdir=runs/caltech`.

Any config field can be overridden: `--config.noise.kind=sym --config.noise.rate=0.5 --config.loss=ce`.
On multi-host systems (TPU pods, multi-node GPU) pass --distributed to call jax.distributed.initialize().
Progress goes to stdout; absl/orbax messages and TensorFlow's C++ lines below WARNING are hidden unless
--verbosity is given (--verbosity=0 shows their INFO lines; XLA's need TF_CPP_MIN_LOG_LEVEL=0 in the
environment: see dspt_jax/cli.py). A run refused for its input (a bad config value, a missing file) ends
with its message and exit status 1; --debug_tracebacks adds the Python traceback.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from dspt_jax import cli, hostmem

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
cli.define_flags()
flags.declare_key_flag("debug_tracebacks")  # listed by --help, not only --helpfull

log = logging.getLogger("dspt_jax")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli.setup_console()  # before the run imports TensorFlow: it reads its log level once, at import
    cli.one_thread_per_tensorflow_op()
    hostmem.keep_freed_memory()  # before the first big allocations
    with cli.reporting_refusals("rerun with the same workdir to resume from its last checkpoint."):
        _run()


def _run() -> None:
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
    if _CONFIG.value.get("compare_losses"):  # configs/demo.py: several losses on one setting, one table
        from dspt_jax import demo

        demo.run_demo(_CONFIG.value, _WORKDIR.value)
    else:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
