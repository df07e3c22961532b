"""Runs a grid of trainings (noise kinds x rates x losses or methods x seeds) on any config, resumably.

  python -m dspt_jax.sweep --config=configs/caltech.py --workdir=runs/caltech_sweep \
      --kinds=sym --rates=0,0.125,0.25,0.5,0.75 --losses=ce,dspt --seeds=1,2,3 [--config.any.field=value]
  ... --losses=ce,gce,dspt --methods=coop,nlprompt   # the methods' comparison: CE, GCE, DSPT and NLPrompt

The third axis is what trains: each loss of `--losses` with plain prompt tuning (method `coop`), plus each
other method of `--methods` (which brings its own losses, e.g. `nlprompt`; `--methods` without `coop` drops
the losses). Each grid point trains in its own sub-workdir
`<workdir>/<kind>_r<rate>/<loss or method>/seed<seed>` (for example `sym_r0.500/dspt/seed1`,
`sym_r0.500/nlprompt/seed1`) by calling `dspt_jax.train.train_and_evaluate` in this process, one point after
the other; with `--vectorize` the missing points train together (`dspt_jax.train.train_runs`: one jitted
step advances all of them, each with its own data, labels, loss, prompt and sub-workdir). An axis left out
takes the base config's value. Rate 0 with a synthetic kind is clean data (the data layer flips
int(0 * N) = 0 labels) and is tabulated under that kind.

Resuming: a point whose results.json exists and matches the point is skipped, so rerunning the same
command after an interruption only runs what is missing (a point cut mid-training resumes from its own
checkpoint). A sub-workdir holding results or a config of a *different* setting is an error, raised before
anything runs. A point that fails is logged and the sweep goes on; the failures are listed at the end and
the exit code is 1 (2 for an invalid grid or a foreign sub-workdir). At the end the sweep aggregates every
results.json under the workdir (`dspt_jax.aggregate`: results_table.md/.csv, robustness_curve.png).

Speed: the CLIP is loaded once for the whole sweep, and the command line turns on JAX's persistent
compilation cache (`<workdir>/jax_cache`) so that points after the first reuse the compiled steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import traceback
from typing import Any, Sequence

import jax
import ml_collections

from dspt_jax import aggregate as aggregate_lib
from dspt_jax import capacity
from dspt_jax import cli as cli_lib
from dspt_jax import files, hostmem
from dspt_jax import methods as methods_lib
from dspt_jax import train
from dspt_jax.data import noise as noise_lib
from dspt_jax.model_source import load_clip

log = logging.getLogger("dspt_jax")

SWEEP_RECORD = "sweep.json"

# Fields of a saved config.json that do not change what a run computes; they may differ on resume.
# ---------------------------------------------------------------------------------------------------------
# The grid.


def _rate_str(rate: float) -> str:
    """Three decimals when they are exact (0.125 -> "0.125", 0.5 -> "0.500"), else the full repr, so that
    two different rates never share a directory."""
    short = f"{rate:.3f}"
    return short if float(short) == rate else repr(rate)


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point. `loss`: a loss of plain prompt tuning, or the name of another method."""

    kind: str
    rate: float
    loss: str
    seed: int

    @property
    def method(self) -> str:
        return self.loss if self.loss in methods_lib.METHODS else "coop"

    @property
    def name(self) -> str:
        """The sub-workdir, relative to the sweep's workdir."""
        return os.path.join(f"{self.kind}_r{_rate_str(self.rate)}", self.loss, f"seed{self.seed}")

    def describe(self) -> str:
        return f"{self.kind} rate={self.rate:g} loss={self.loss} seed={self.seed}"


def _unique(values: Sequence, axis: str) -> list:
    values = list(values)
    if not values:
        raise ValueError(f"the sweep's {axis} list is empty")
    seen = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{v!r} appears twice in the sweep's {axis}: {values}")
        seen.add(v)
    return values


def objectives(losses: Sequence[str], methods: Sequence[str]) -> list[str]:
    """The grid's third axis: `losses` (with method coop) when `methods` has coop, then every other method."""
    for m in methods:
        if m not in methods_lib.METHODS:
            raise ValueError(f"--methods: {m!r} is not one of {methods_lib.METHODS}")
    return (list(losses) if "coop" in methods else []) + [m for m in methods if m != "coop"]


def make_grid(
    kinds: Sequence[str], rates: Sequence[float], losses: Sequence[str], seeds: Sequence[int]
) -> list[Point]:
    """Every (kind, rate, loss, seed), seed-major: the whole curve of seed 1 is done before seed 2 starts,
    so an early look at a long sweep already shows every setting once."""
    kinds = _unique([str(k) for k in kinds], "kinds")
    rates = _unique([noise_lib.check_rate(r) for r in rates], "rates")
    losses = _unique([str(l) for l in losses], "losses")
    seeds = _unique([noise_lib.check_seed(s) for s in seeds], "seeds")
    return [
        Point(kind, rate, loss, seed) for seed in seeds for kind in kinds for rate in rates for loss in losses
    ]


def point_config(base: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
    """A copy of `base` with the point's noise kind, rate, loss (or method) and seed."""
    config = base.copy_and_resolve_references()
    config.noise.kind = point.kind
    config.noise.rate = float(point.rate)
    config.method = point.method
    if point.method == "coop":
        config.loss = point.loss
    config.seed = point.seed
    return config


def validate_grid(base: ml_collections.ConfigDict, points: Sequence[Point]) -> None:
    """Checks every point's config (train.validate_config) before anything runs: a bad combination such
    as kind "none" with rate 0.5 fails now, not hours into the sweep."""
    if base.noise.num_flips is not None:
        raise ValueError(
            f"config.noise.num_flips={base.noise.num_flips} would override the sweep's rate axis; "
            "leave it unset (a per-class kind then flips int(rate * shots) shots per class)."
        )
    for point in points:
        try:
            train.validate_config(point_config(base, point))
        except ValueError as e:
            raise ValueError(f"grid point {point.describe()}: {e}") from None


# ---------------------------------------------------------------------------------------------------------
# Resume: what is done, and is it really this point?


def _json_roundtrip(obj) -> Any:
    return train._as_json(obj)


def _results_mismatches(results: dict, config: ml_collections.ConfigDict) -> list[str]:
    noise = results.get("noise") or {}
    found = {
        "noise.kind": noise.get("kind"),
        "noise.rate": noise.get("rate"),
        "loss": results.get("loss"),
        "seed": results.get("seed"),
        "shots": results.get("shots"),
        "model": results.get("model"),
    }
    expected = {
        "noise.kind": config.noise.kind,
        "noise.rate": config.noise.rate,
        "loss": train.training_objective(config),
        "seed": config.seed,
        "shots": config.data.shots,
        "model": config.model.source,
    }
    out = []
    for key, want in expected.items():
        got = found[key]
        same = (
            (isinstance(got, (int, float)) and abs(float(got) - float(want)) < 1e-12)
            if key == "noise.rate"
            else got == want
        )
        if not same:
            out.append(f"{key}: found {got!r}, expected {want!r}")
    return out


def point_status(point_dir: str, config: ml_collections.ConfigDict) -> str:
    """ "done" if `point_dir` has a results.json of this config, else "todo".

    Raises ValueError if its results.json or config.json belongs to a different setting: skipping it would
    tabulate the wrong run, and training into it would resume someone else's checkpoint.
    """
    problems = []
    config_path = files.join(point_dir, "config.json")
    if files.exists(config_path):
        problems += train.config_mismatches(files.read_json(config_path), config)
    results_path = files.join(point_dir, "results.json")
    done = files.exists(results_path)
    if done:
        try:
            results = files.read_json(results_path)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{results_path} is not valid JSON ({e}); remove it to rerun the point."
            ) from None
        problems += _results_mismatches(results, config)
    if problems:
        raise ValueError(
            f"{point_dir} holds a run of a different setting ({'; '.join(problems)}). Use a new "
            "--workdir for a different sweep, or remove that directory."
        )
    return "done" if done else "todo"


# ---------------------------------------------------------------------------------------------------------
# Running.


@dataclasses.dataclass
class SweepReport:
    """What a sweep did: point names ran, skipped (finished before) and failed (name, error)."""

    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    aggregate_paths: dict | None = None
    aggregate_error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and self.aggregate_error is None


class _ClipCache:
    """Loads each CLIP once for the whole sweep instead of once per point (seconds per point for a
    ViT-B/16 from disk). A run only reads its CLIP, so sharing the object is safe."""

    def __init__(self):
        self._clips = {}

    def get(self, config: ml_collections.ConfigDict):
        key = (config.model.source, config.model.compute_dtype)
        if key not in self._clips:
            self._clips[key] = load_clip(config.model.source, dtype=train.DTYPES[config.model.compute_dtype])
        return self._clips[key]


def _hms(seconds: float) -> str:
    seconds = int(max(0, round(seconds)))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _runs_per_program(config: ml_collections.ConfigDict, clips: _ClipCache, num_points: int) -> int:
    """--max_runs_per_program when not given: as many points as fit in the devices' free memory
    (`capacity.fit_runs`), or all of them when XLA cannot say."""
    try:
        fit = capacity.fit_runs(config, clips.get(config), wanted=num_points)
    except NotImplementedError as e:
        log.warning("--max_runs_per_program not given and not estimated (%s): all %d points in one program",
                    e, num_points)
        return num_points
    log.info("--max_runs_per_program not given: %s", fit.describe())
    return min(fit.runs, num_points)


def run_sweep(
    base_config: ml_collections.ConfigDict,
    workdir: str,
    kinds: Sequence[str],
    rates: Sequence[float],
    losses: Sequence[str],
    seeds: Sequence[int],
    *,
    aggregate: bool = True,
    vectorize: bool = False,
    max_runs_per_program: int | None = None,
) -> SweepReport:
    """Runs every missing grid point, then aggregates `workdir` (see the module docstring).

    One point after another, or with `vectorize` the missing points together (`train.train_runs`: one
    jitted step for up to `max_runs_per_program` points, default as many as fit in the devices' free
    memory, `capacity.fit_runs`), each still in its own sub-workdir with the files a sequential run writes.

    Raises ValueError, before any training, for an invalid grid or a sub-workdir of a different setting.
    A point (or a group of points trained together) that raises an Exception is recorded in the report's
    `failed` and the sweep continues; KeyboardInterrupt stops it (the interrupted points have saved a
    checkpoint; rerun to resume).
    """
    if max_runs_per_program is not None and max_runs_per_program < 1:
        raise ValueError(f"--max_runs_per_program must be >= 1, got {max_runs_per_program}")
    points = make_grid(kinds, rates, losses, seeds)
    validate_grid(base_config, points)
    configs = [point_config(base_config, p) for p in points]
    status, problems = [], []
    for point, config in zip(points, configs):
        try:
            status.append(point_status(files.join(workdir, point.name), config))
        except ValueError as e:
            problems.append(str(e))
    if problems:  # all of them at once: a user fixing one at a time would otherwise rerun N times
        raise ValueError("\n".join(problems))
    lead = jax.process_index() == 0

    if lead:
        record = {
            "kinds": list(kinds),
            "rates": [float(r) for r in rates],
            "losses": list(losses),
            "seeds": [int(s) for s in seeds],
            "points": [p.name for p in points],
            "base_config": _json_roundtrip(base_config.to_dict()),
        }
        files.write_json(files.join(workdir, SWEEP_RECORD), record)

    report = SweepReport()
    total, todo = len(points), status.count("todo")
    log.info("Sweep of %d points in %s: %d to run, %d finished before", total, workdir, todo, total - todo)
    start = time.time()
    durations: list[float] = []
    remaining = todo
    clips = _ClipCache()
    todo_items = []
    for i, (point, config, state) in enumerate(zip(points, configs, status), 1):
        if state == "done":
            report.skipped.append(point.name)
            log.info("[%d/%d] %s: finished before, skipped", i, total, point.describe())
        else:
            todo_items.append((i, point, config))
    size = 1
    if vectorize and max_runs_per_program:
        size = max_runs_per_program
    elif vectorize and len(todo_items) > 1:
        size = _runs_per_program(todo_items[0][2], clips, len(todo_items))
    # Runs trained together must share their method: the groups never mix two.
    by_method = {}
    for item in todo_items:
        by_method.setdefault(item[1].method, []).append(item)
    groups = [items[g : g + size] for items in by_method.values() for g in range(0, len(items), size)]
    for group in groups:
        workdirs = [files.join(workdir, point.name) for _, point, _ in group]
        for (i, point, _), sub in zip(group, workdirs):
            log.info("[%d/%d] %s: running in %s%s", i, total, point.describe(), sub,
                     f" (together with {len(group) - 1} more)" if len(group) > 1 else "")
        t0 = time.time()
        try:
            configs_g = [config for _, _, config in group]
            clip = clips.get(configs_g[0])
            if vectorize:
                results = train.train_runs(configs_g, workdirs, clip=clip)
            else:
                results = [train.train_and_evaluate(configs_g[0], workdirs[0], clip=clip)]
            outcomes = [f"test accuracy {r['final']['accuracy']:.4f}" for r in results]
        except Exception as e:  # noqa: BLE001 -- one bad point (or group) must not end a long sweep
            names = ", ".join(point.describe() for _, point, _ in group)
            # Refused input (a missing dataset, a bad value) is its message; a bug keeps its traceback.
            trace = "" if cli_lib.is_refusal(e) else "\n" + traceback.format_exc()
            log.error("%s FAILED: %s%s", names, e, trace)
            if jax.process_count() > 1:
                # The error may be this host's alone (an unreadable image in its rows): going on to the
                # next point while the other hosts wait in this one's collectives would hang the sweep.
                raise
            report.failed += [(point.name, f"{type(e).__name__}: {e}") for _, point, _ in group]
            outcomes = ["failed"] * len(group)
        else:
            report.ran += [point.name for _, point, _ in group]
        durations += [(time.time() - t0) / len(group)] * len(group)
        remaining -= len(group)
        eta = remaining * sum(durations) / len(durations)
        for (i, point, _), outcome in zip(group, outcomes):
            log.info(
                "[%d/%d] %s: %s in %s; elapsed %s, ETA %s",
                i,
                total,
                point.describe(),
                outcome,
                _hms(durations[-1] * len(group)),
                _hms(time.time() - start),
                _hms(eta),
            )

    log.info(
        "Sweep done in %s: %d ran, %d skipped, %d failed",
        _hms(time.time() - start),
        len(report.ran),
        len(report.skipped),
        len(report.failed),
    )
    for name, error in report.failed:
        log.error("  failed: %s (%s)", name, error)
    if aggregate and lead:
        try:
            report.aggregate_paths = aggregate_lib.aggregate_dir(workdir)
            log.info(
                "Tables: %s, %s; curve: %s",
                report.aggregate_paths["md"],
                report.aggregate_paths["csv"],
                report.aggregate_paths["png"],
            )
        except (ValueError, OSError) as e:
            report.aggregate_error = str(e)
            log.error("Aggregation failed: %s", e)
    return report


# ---------------------------------------------------------------------------------------------------------
# Command line. The flags are defined by `define_flags`, not at import, so that importing this module
# never clashes with dspt_jax.main's --config/--workdir in the same process.


def define_flags(flag_values=None, sys_argv: Sequence[str] | None = None) -> None:
    """Defines the sweep's flags on `flag_values` (default absl's global FLAGS). `sys_argv` is where
    ml_collections looks for --config.* overrides (default sys.argv)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FLAGS if flag_values is None else flag_values
    cli_lib.define_flags(fv)
    flags.declare_key_flag("debug_tracebacks", flag_values=fv)  # listed by --help, not only --helpfull
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Path to an ml_collections config file (the base config).",
        flag_values=fv,
        lock_config=True,
        sys_argv=None if sys_argv is None else list(sys_argv),
    )
    flags.DEFINE_string(
        "workdir", None, "Directory of the sweep: one sub-workdir per grid point.", flag_values=fv
    )
    flags.DEFINE_list("kinds", None, "Noise kinds (default: the config's noise.kind).", flag_values=fv)
    flags.DEFINE_list(
        "rates", None, "Noise rates in [0, 1] (default: the config's noise.rate).", flag_values=fv
    )
    flags.DEFINE_list(
        "losses", None, "Losses: ce, dspt, gce, mae, sce, nce_rce, taylor_ce (default: the config's loss).",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "methods", None,
        "Methods: coop (trains each of --losses), nlprompt, joapr, elr (default: the config's method).",
        flag_values=fv,
    )
    flags.DEFINE_list("seeds", None, "Integer seeds (default: the config's seed).", flag_values=fv)
    flags.DEFINE_bool(
        "aggregate", True, "Write the tables and the curve into --workdir at the end.", flag_values=fv
    )
    flags.DEFINE_string(
        "jax_cache_dir",
        "",
        "JAX's persistent compilation cache, shared by the points (most of "
        "them compile the same steps): '' = <workdir>/jax_cache, 'none' = off. A cache already set "
        "through JAX_COMPILATION_CACHE_DIR is kept.",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "vectorize",
        False,
        "Train the missing points together, one jitted step for all (train.train_runs); each point keeps its "
        "own sub-workdir and files.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "max_runs_per_program",
        None,
        "With --vectorize: at most this many points per jitted program (default: as many as fit in the "
        "devices' free memory, from XLA's memory analysis of the step; see dspt_jax/capacity.py).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "Call jax.distributed.initialize() first (the workdir must be on a file system all hosts see).",
        flag_values=fv,
    )
    flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)


def _parse_list(values, convert, axis: str) -> list:
    out = []
    for v in values:
        try:
            out.append(convert(v))
        except ValueError:
            raise ValueError(f"--{axis}: {v!r} is not a valid {convert.__name__}") from None
    return out


def enable_compilation_cache(cache_dir: str) -> str | None:
    """Turns on JAX's persistent compilation cache at `cache_dir` unless one is configured already; returns
    the directory in use. Each point jits fresh closures, so without it every point recompiles the same
    train and eval steps. Call before the first compilation: JAX decides once per process."""
    current = jax.config.jax_compilation_cache_dir
    if current is None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        current = cache_dir
    return current


def run_from_flags(fv) -> int:
    """Runs the sweep the parsed flags describe; returns the exit code (0 ok, 1 failures).
    ValueError (invalid grid or flags, foreign sub-workdir) is raised, not turned into a code."""
    config = fv["config"].value
    if fv["jax_cache_dir"].value != "none":
        cache = enable_compilation_cache(
            fv["jax_cache_dir"].value or files.join(fv["workdir"].value, "jax_cache")
        )
        log.info("JAX compilation cache: %s", cache)
    kinds = fv["kinds"].value or [config.noise.kind]
    rates = _parse_list(fv["rates"].value or [config.noise.rate], float, "rates")
    methods = fv["methods"].value or [config.method]
    losses = objectives(fv["losses"].value or [config.loss], methods)
    seeds = _parse_list(fv["seeds"].value or [config.seed], int, "seeds")
    report = run_sweep(
        config,
        fv["workdir"].value,
        kinds,
        rates,
        losses,
        seeds,
        aggregate=fv["aggregate"].value,
        vectorize=fv["vectorize"].value,
        max_runs_per_program=fv["max_runs_per_program"].value,
    )
    return 0 if report.ok else 1


def cli(fv) -> int:
    """run_from_flags with the command line's exit codes: 0 ok, 1 failed points, 2 invalid grid or flags or a
    foreign sub-workdir (reported as a message, with its traceback only under --debug_tracebacks)."""
    try:
        return run_from_flags(fv)
    except ValueError as e:
        log.error("error: %s", e, exc_info="debug_tracebacks" in fv and fv["debug_tracebacks"].value)
        return 2


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cli_lib.setup_console()  # before the points import TensorFlow: it reads its log level once, at import
    cli_lib.one_thread_per_tensorflow_op()
    hostmem.keep_freed_memory()  # before the first big allocations
    # What cli() leaves uncaught (missing inputs, Ctrl-C, SIGTERM) becomes a message and an exit status.
    with cli_lib.reporting_refusals("rerun the same command to resume."):
        if flags.FLAGS["distributed"].value:
            jax.distributed.initialize()
        return cli(flags.FLAGS)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
