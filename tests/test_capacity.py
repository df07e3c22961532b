"""How many runs fit in one program: the arithmetic, the free memory read, XLA's memory analysis of the
run-axis step against a compiled program of more runs, and the sweep's groups when the limit is not given."""

import os
import sys
import types

import jax
import numpy as np
import pytest

from dspt_jax import capacity, sweep, train

sys.path.insert(0, os.path.dirname(__file__))
from test_sweep import POINTS, FakeTrain, smoke_config  # noqa: E402


def test_runs_that_fit_is_the_largest_r_with_fixed_plus_r_per_run_within_the_usable_memory():
    assert capacity.runs_that_fit(fixed_bytes=10, per_run_bytes=3, usable_bytes=40) == 10  # 10 + 30 = 40
    assert capacity.runs_that_fit(fixed_bytes=10, per_run_bytes=3, usable_bytes=39) == 9
    assert capacity.runs_that_fit(fixed_bytes=50, per_run_bytes=3, usable_bytes=40) == 1  # never 0
    with pytest.raises(ValueError, match="per_run_bytes"):
        capacity.runs_that_fit(1, 0, 40)


def _meminfo_available() -> int:
    fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
    kib, unit = fields["MemAvailable"].split()
    assert unit == "kB"
    return int(kib) * 1024


def test_free_memory_on_cpu_is_half_the_hosts_available_memory_per_device():
    free, usable, where = capacity.free_memory()
    assert "MemAvailable" in where
    # MemAvailable moves while the suite runs: within 10 % of this test's own read.
    assert abs(free - _meminfo_available()) < 0.1 * free
    assert usable == int(free * capacity.HOST_FRACTION / len(jax.local_devices()))


def test_free_memory_on_an_accelerator_is_its_limit_less_what_is_in_use():
    gpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200",
                                memory_stats=lambda: {"bytes_limit": 1000, "bytes_in_use": 200})
    assert capacity.free_memory(gpu) == (800, 640, "NVIDIA H200: bytes_limit - bytes_in_use")


def test_the_linear_model_from_one_and_two_runs_predicts_a_compiled_program_of_six():
    """fixed + R x per run from the R = 1 and R = 2 programs, against XLA's analysis of the R = 6 program
    of the tiny CLIP (measured: within 10 %; XLA's temporaries do not grow exactly linearly)."""
    config = smoke_config()
    run = train.setup_run(config, None, None)
    tx, _ = train.make_optimizer(config, run.steps_per_epoch, run.num_epochs)
    one, two, six = (capacity.program_bytes(run, tx, r) for r in (1, 2, 6))
    assert one < two < six
    predicted = one + 5 * (two - one)
    assert abs(predicted - six) <= 0.25 * six, (one, two, six)
    assert six <= 6 * one  # fit_runs's shortcut: R copies of the one-run program hold R runs


def test_the_probe_compile_gives_the_analysis_of_the_optimized_program():
    """capacity compiles its probe programs with LLVM's optimizations off: the same buffer figures."""
    config = smoke_config()
    run = train.setup_run(config, None, None)
    tx, _ = train.make_optimizer(config, run.steps_per_epoch, run.num_epochs)
    lowered = capacity.step_lowered(run, tx, 3)
    fast = lowered.compile(capacity.ANALYSIS_COMPILER_OPTIONS).memory_analysis()
    full = lowered.compile().memory_analysis()
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    assert [getattr(fast, f) for f in fields] == [getattr(full, f) for f in fields]
    assert full.temp_size_in_bytes > 0


def test_fit_runs_reports_its_figures():
    config = smoke_config()
    fit = capacity.fit_runs(config, None)
    assert fit.per_run_bytes > 0 and fit.fixed_bytes >= 0
    assert fit.runs == capacity.runs_that_fit(fit.fixed_bytes, fit.per_run_bytes, fit.usable_bytes)
    assert "runs per program" in fit.describe() and "MiB per run" in fit.describe()


def test_with_several_processes_every_host_takes_the_fewest_runs_any_host_can(monkeypatch):
    """Hosts with different free memory must still form the same groups: fit_runs takes the minimum of
    every process's own figure (here a second host that fits 3 runs, this one 1,000)."""
    mib = 2**20
    monkeypatch.setattr(capacity, "free_memory", lambda: (4000 * mib, 2000 * mib, "test"))
    monkeypatch.setattr(capacity, "program_bytes", lambda run, tx, n: (2 + n) * mib)  # fixed 2, 1 per run
    gathered = []

    def allgather(x):
        gathered.append(int(x))
        return np.array([x, 3], np.int32)

    monkeypatch.setattr(capacity.multihost_utils, "process_allgather", allgather)
    config = smoke_config()
    assert capacity.fit_runs(config, None).runs == 1998  # one process: its own figure, nothing gathered
    assert gathered == []
    monkeypatch.setattr(capacity.jax, "process_count", lambda: 2)
    assert capacity.fit_runs(config, None).runs == 3
    assert gathered == [1998]


def test_when_the_wanted_runs_fit_as_copies_of_the_one_run_program_only_that_program_is_compiled(monkeypatch):
    mib = 2**20
    monkeypatch.setattr(capacity, "free_memory", lambda: (4000 * mib, 2000 * mib, "test"))
    compiled = []

    def program_bytes(run, tx, n):
        compiled.append(n)
        return (2 + n) * mib  # fixed 2, 1 per run: the one-run program is 3 MiB

    monkeypatch.setattr(capacity, "program_bytes", program_bytes)
    config = smoke_config()
    fit = capacity.fit_runs(config, None, wanted=666)  # 666 x 3 = 1998 MiB <= 2000
    assert (fit.runs, fit.bound, fit.per_run_bytes, compiled) == (666, True, 3 * mib, [1])
    assert fit.describe().startswith("all 666 runs in one program: at most 666 x 3.0 MiB")
    compiled.clear()
    fit = capacity.fit_runs(config, None, wanted=667)  # 2001 MiB of copies: the linear model decides
    assert (fit.runs, fit.bound, compiled) == (1998, False, [1, 2])


class FakeTrainRuns:
    """Stands in for train.train_runs: records each program's points and writes their results."""

    def __init__(self):
        self.groups = []
        self.one = FakeTrain()

    def __call__(self, configs, workdirs, clip=None):
        self.groups.append([os.path.relpath(w, os.path.dirname(os.path.dirname(os.path.dirname(w))))
                            for w in workdirs])
        return [self.one(c, w) for c, w in zip(configs, workdirs)]


GRID = dict(kinds=["sym"], rates=[0.0, 0.5], losses=["ce", "dspt"], seeds=[1])


def test_a_vectorized_sweep_without_a_limit_groups_as_many_points_as_fit(tmp_path, monkeypatch):
    fake = FakeTrainRuns()
    monkeypatch.setattr(train, "train_runs", fake)
    fit = capacity.Fit(runs=3, fixed_bytes=1, per_run_bytes=1, free_bytes=8, usable_bytes=4, where="test")
    monkeypatch.setattr(capacity, "fit_runs", lambda config, clip, wanted=None: fit)
    monkeypatch.setattr(sweep._ClipCache, "get", lambda self, config: None)
    report = sweep.run_sweep(smoke_config(), str(tmp_path), **GRID, vectorize=True, aggregate=False)
    assert report.ok and [len(g) for g in fake.groups] == [3, 1]
    assert sorted(sum(fake.groups, [])) == sorted(POINTS)


def test_without_xla_memory_figures_every_point_goes_into_one_program(tmp_path, monkeypatch):
    fake = FakeTrainRuns()
    monkeypatch.setattr(train, "train_runs", fake)

    def no_analysis(config, clip, wanted=None):
        raise NotImplementedError("XLA reports no memory analysis on tpu")

    monkeypatch.setattr(capacity, "fit_runs", no_analysis)
    monkeypatch.setattr(sweep._ClipCache, "get", lambda self, config: None)
    report = sweep.run_sweep(smoke_config(), str(tmp_path), **GRID, vectorize=True, aggregate=False)
    assert report.ok and [len(g) for g in fake.groups] == [4]
