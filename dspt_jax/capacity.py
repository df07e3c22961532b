"""How many runs fit in one jitted program (`sweep --vectorize` without `--max_runs_per_program`).

XLA's memory analysis of the compiled run-axis step (`train.jit_runs_step`) at R = 1 and R = 2 runs gives
a fixed part (CLIP's weights, the shared inputs) and a per-run part (a prompt, its optimizer state, its
labels, its images and its text-tower activations); R runs are taken to need fixed + R x per run, and as
many runs go into one program as fit in a fraction of the memory free on a device:

* GPU / TPU: the device's `bytes_limit` less its `bytes_in_use` (`Device.memory_stats()`);
* CPU: the host's `MemAvailable` (/proc/meminfo), shared by the process's CPU devices, of which only half
  is counted: the same memory holds the input pipelines, the datasets and the evaluation features.

When R copies of the one-run program fit, R runs do (R x (fixed + per run) is more than they need) and the
R = 2 program is not compiled: a sweep whose points all fit pays for one probe compile, not two.

The estimate is for plain prompt tuning with one input stream per run (the most images a program can
hold: runs of one seed share theirs). A method's per-example columns add a few numbers per example.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dspt_jax import losses, methods

log = logging.getLogger("dspt_jax")

# Of the free memory, the share a program may take: XLA's analysis leaves out its runtime's own buffers,
# and the linear model is an estimate.
DEVICE_FRACTION = 0.8
# On a CPU, the host memory the devices share also holds everything else of the process.
HOST_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Fit:
    """How many runs fit in one program, and the figures that say so (bytes per device)."""

    runs: int
    fixed_bytes: int
    per_run_bytes: int
    free_bytes: int
    usable_bytes: int
    where: str  # which memory was measured, in words
    # True: only the one-run program was compiled, and `runs` copies of it fit (`per_run_bytes` is its size,
    # `fixed_bytes` 0): an upper bound on what `runs` runs need, as each copy counts the shared part again.
    bound: bool = False

    def describe(self) -> str:
        mib = 2**20
        if self.bound:
            return (f"all {self.runs} runs in one program: at most {self.runs} x {self.per_run_bytes / mib:.1f} MiB "
                    f"(the one-run program, XLA's memory analysis) in {self.usable_bytes / mib:.0f} of "
                    f"{self.free_bytes / mib:.0f} MiB free ({self.where})")
        return (f"{self.runs} runs per program: {self.per_run_bytes / mib:.1f} MiB per run and "
                f"{self.fixed_bytes / mib:.1f} MiB shared (XLA's memory analysis) in {self.usable_bytes / mib:.0f} "
                f"of {self.free_bytes / mib:.0f} MiB free ({self.where})")


def runs_that_fit(fixed_bytes: int, per_run_bytes: int, usable_bytes: int) -> int:
    """The most runs R with fixed + R x per_run <= usable; at least 1 (one run is trained anyway, and a
    run that does not fit fails as it would alone)."""
    if per_run_bytes <= 0:
        raise ValueError(f"per_run_bytes must be positive, got {per_run_bytes}")
    return max(1, (usable_bytes - fixed_bytes) // per_run_bytes)


def free_memory(device=None) -> tuple[int, int, str]:
    """(free bytes, the bytes a program may use, in words which memory) for one device of this process."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return free, int(free * DEVICE_FRACTION), f"{device.device_kind}: bytes_limit - bytes_in_use"
    free = _mem_available()
    n = len(jax.local_devices())
    where = "host MemAvailable" + (f", shared by {n} CPU devices" if n > 1 else "")
    return free, int(free * HOST_FRACTION / n), where


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


# The analysis comes from XLA's buffer assignment, made before code generation: compiling the probe programs
# with LLVM's optimizations off gives the same figures in about 60% of the time (demo: 2.3 s instead of 3.8).
ANALYSIS_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def step_lowered(run, tx, num_runs: int):
    """The jitted step of `num_runs` runs set up like `run` (a `train.Run`), each with its own input stream,
    lowered for abstract arguments (nothing allocated)."""
    from dspt_jax import train  # train imports nothing from here; the import stays local to keep it so

    config = run.config
    state = jax.eval_shape(lambda: train.create_train_state(run, tx))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_runs, *x.shape), x.dtype), state)
    state = state.replace(step=jax.ShapeDtypeStruct((), jnp.int32))
    rows = run.batch_size
    if run.feature_mode.cached:
        images = {"image_features": ((rows, run.clip.config.projection_dim), np.float32)}
    else:
        size = config.data.image_size
        images = {"image": ((rows, size, size, 3), np.float32)}
    batch = {
        "label": jax.ShapeDtypeStruct((num_runs, rows), jnp.int32),
        "mask": jax.ShapeDtypeStruct((num_runs, rows), jnp.bool_),
        **{k: jax.ShapeDtypeStruct((num_runs, *shape), dtype) for k, (shape, dtype) in images.items()},
    }
    objective = methods.plain(losses.get_loss_fn("ce"))
    step = train.jit_runs_step(run, [objective], tx)
    return step.lower(
        state,
        jax.eval_shape(lambda: run.clip_params),
        jax.eval_shape(lambda: run.frozen_embeds),
        jax.ShapeDtypeStruct((num_runs,), jnp.int32),
        batch,
        jax.ShapeDtypeStruct((num_runs,), jnp.int32),
    )


def program_bytes(run, tx, num_runs: int) -> int:
    """Bytes one device needs for the jitted step of `num_runs` runs set up like `run` (a `train.Run`), each
    with its own input stream: XLA's arguments + outputs + temporaries, less what donation lets outputs
    reuse. Compiles the step (without running it)."""
    m = step_lowered(run, tx, num_runs).compile(ANALYSIS_COMPILER_OPTIONS).memory_analysis()
    if m is None:
        raise NotImplementedError(f"XLA reports no memory analysis on {jax.default_backend()}")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def fit_runs(config: ml_collections.ConfigDict, clip, wanted: int | None = None) -> Fit:
    """How many runs of `config`'s setting fit in one program on this process's devices (with several
    processes: the fewest any host can take). `clip`: the loaded CLIP of `config.model.source`. Loads the
    task (without writing anything) and compiles the step for one run; when `wanted` copies of that program
    fit, so do `wanted` runs (they share CLIP's weights and the images), and that is the answer; else the
    step for two runs is compiled too, for the linear model."""
    from dspt_jax import train

    free, usable, where = free_memory()  # before set-up puts a copy of CLIP's weights on the devices
    run = train.setup_run(config, None, clip)
    tx, _ = train.make_optimizer(config, run.steps_per_epoch, run.num_epochs)
    one = program_bytes(run, tx, 1)
    if wanted is not None and wanted * one <= usable:
        fit = Fit(wanted, 0, one, free, usable, where, bound=True)
    else:
        per_run = max(program_bytes(run, tx, 2) - one, 1)
        fixed = max(one - per_run, 0)
        fit = Fit(runs_that_fit(fixed, per_run, usable), fixed, per_run, free, usable, where)
    if jax.process_count() > 1:  # every host must form the same groups, or they wait on each other forever
        runs = int(np.min(multihost_utils.process_allgather(np.int32(fit.runs))))
        fit = dataclasses.replace(fit, runs=runs)
    return fit
