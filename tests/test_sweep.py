"""The sweep: grid and names, up-front validation, a tiny real sweep on configs/smoke.py, skip on rerun,
resume of a lost point, foreign sub-workdirs, failures and the command line."""

import importlib.util
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags
from conftest import without_compilation_cache

from dspt_jax import sweep, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def smoke_config():
    spec = importlib.util.spec_from_file_location("smoke_config", REPO / "configs" / "smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.num_epochs = 1  # 4 steps of the tiny CLIP: the sweep's mechanics, not accuracy
    config.max_steps = 2
    return config


def fake_results(config) -> dict:
    """What train.py would write for `config`, with an accuracy that encodes the point (for checks)."""
    acc = 0.5 + 0.1 * config.noise.rate + (0.01 if config.loss == "dspt" else 0.0) + 0.002 * config.seed
    return {
        "dataset": config.data.name,
        "num_classes": 4,
        "shots": config.data.shots,
        "loss": config.loss,
        "gce_q": None,
        "noise": {"kind": config.noise.kind, "rate": config.noise.rate, "num_flips": None, "record": None},
        "seed": config.seed,
        "model": config.model.source,
        "prompt": config.prompt.to_dict(),
        "steps": 2,
        "epochs": config.num_epochs,
        "zero_shot": {"accuracy": 0.25},
        "final": {"accuracy": acc},
        "epoch_evals": [],
        "train": None,
        "wall_time_s": 0.0,
    }


class FakeTrain:
    """Stands in for train.train_and_evaluate: records the configs, writes results.json, may fail."""

    def __init__(self, fail_on=()):
        self.calls = []
        self.fail_on = set(fail_on)

    def __call__(self, config, workdir, clip=None):
        self.calls.append((config, workdir))
        if (
            os.path.relpath(workdir, os.path.dirname(os.path.dirname(os.path.dirname(workdir))))
            in self.fail_on
        ):
            raise RuntimeError("boom")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f)
        results = fake_results(config)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)
        return results


def no_training(config, workdir, clip=None):
    raise AssertionError(f"a skipped sweep must not train ({workdir})")


# ---------------------------------------------------------------------------------------------------------
# Grid.


def test_grid_order_and_names():
    points = sweep.make_grid(["sym"], [0, 0.5], ["ce", "dspt"], [1, 2])
    # Seed-major: the whole curve of seed 1 first.
    assert [p.name for p in points] == [
        "sym_r0.000/ce/seed1",
        "sym_r0.000/dspt/seed1",
        "sym_r0.500/ce/seed1",
        "sym_r0.500/dspt/seed1",
        "sym_r0.000/ce/seed2",
        "sym_r0.000/dspt/seed2",
        "sym_r0.500/ce/seed2",
        "sym_r0.500/dspt/seed2",
    ]
    assert all(isinstance(p.rate, float) for p in points)
    # Rates that 3 decimals would merge keep distinct directories.
    a, b = sweep.make_grid(["sym"], [0.0625, 0.063], ["ce"], [1])
    assert a.name == os.path.join("sym_r0.0625", "ce", "seed1") and b.name == os.path.join(
        "sym_r0.063", "ce", "seed1"
    )


@pytest.mark.parametrize(
    "args, match",
    [
        ((["sym"], [0.5, 0.5], ["ce"], [1]), "twice"),
        ((["sym"], [], ["ce"], [1]), "empty"),
        ((["sym"], [1.5], ["ce"], [1]), r"rate must be in \[0, 1\]"),
        ((["sym"], [0.5], ["ce"], [-1]), "seed"),
    ],
)
def test_grid_rejects_bad_axes(args, match):
    with pytest.raises(ValueError, match=match):
        sweep.make_grid(*args)


def test_invalid_points_fail_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    base = smoke_config()
    with pytest.raises(ValueError, match="kind 'none'.*rate must be 0"):
        sweep.run_sweep(base, str(tmp_path), ["none"], [0, 0.5], ["ce"], [1])
    with pytest.raises(ValueError, match="Unknown loss .nope."):
        sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], ["ce", "nope"], [1])
    base.noise.num_flips = 2
    with pytest.raises(ValueError, match="num_flips"):
        sweep.run_sweep(base, str(tmp_path), ["symflip"], [0.5], ["ce"], [1])
    assert not os.path.exists(tmp_path / "sym_r0.500")


def test_point_config_changes_only_the_grid_fields():
    base = smoke_config()
    config = sweep.point_config(base, sweep.Point("asym", 0.25, "gce", 3))
    assert (config.noise.kind, config.noise.rate, config.loss, config.seed) == ("asym", 0.25, "gce", 3)
    assert (base.noise.kind, base.noise.rate, base.loss, base.seed) == ("sym", 0.25, "dspt", 1)
    for key in ("model", "data", "prompt", "optim", "num_epochs", "max_steps", "batch_size"):
        assert config[key] == base[key]


# ---------------------------------------------------------------------------------------------------------
# A real sweep (tiny CLIP, toy data): 2 rates x 2 losses x 1 seed through the command line, then a rerun
# that skips everything and one that redoes a lost point (both in-process, the trainer mocked out). The
# command line runs in a subprocess because it turns on JAX's persistent compilation cache (process-wide
# state pytest must not share): points 2-4 then reuse most of point 1's compilations, which makes this
# faster than running in-process.

POINTS = ["sym_r0.000/ce/seed1", "sym_r0.000/dspt/seed1", "sym_r0.500/ce/seed1", "sym_r0.500/dspt/seed1"]
GRID_FLAGS = [
    "--config=configs/smoke.py",
    "--config.num_epochs=1",
    "--config.max_steps=2",
    "--kinds=sym",
    "--rates=0,0.5",
    "--losses=ce,dspt",
    "--seeds=1",
]


def run_cli(workdir, *extra):
    out = subprocess.run(
        [sys.executable, "-m", "dspt_jax.sweep", f"--workdir={workdir}", *GRID_FLAGS, *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=without_compilation_cache(os.environ),  # the sweep's own cache, <workdir>/jax_cache, is checked
    )
    return out.returncode, out.stdout + out.stderr


def test_real_sweep_rerun_and_resume(tmp_path, monkeypatch):
    # One test, not three sharing a module fixture: under pytest-xdist a shared fixture would run the
    # sweep once per worker.
    workdir = str(tmp_path)
    code, log = run_cli(workdir)
    assert code == 0, log
    check_first_run(workdir, log)
    check_rerun_skips_everything(workdir, monkeypatch)
    check_lost_point_is_rerun_alone(workdir, monkeypatch)


def check_first_run(workdir, log):
    for i, name in enumerate(POINTS, 1):
        rate = 0.0 if i < 3 else 0.5
        assert (
            f"[{i}/4] sym rate={rate:g} loss={name.split('/')[1]} seed=1: running in "
            f"{os.path.join(workdir, name)}" in log
        )
    assert "4 ran, 0 skipped, 0 failed" in log and "ETA" in log
    accs = {}
    for name in POINTS:
        with open(os.path.join(workdir, name, "results.json")) as f:
            results = json.load(f)
        kind_rate, loss, seed = name.split("/")
        assert (results["noise"]["kind"], results["noise"]["rate"], results["loss"], results["seed"]) == (
            "sym",
            float(kind_rate[len("sym_r") :]),
            loss,
            int(seed[len("seed") :]),
        )
        assert results["steps"] == 2 and results["epochs"] == 1 and results["dataset"] == "toy"
        # Rate 0 is clean data under kind "sym": nothing flipped; at 0.5 half of the 32 shots are.
        assert results["train"]["num_flipped"] == (0 if kind_rate.endswith("0.000") else 16)
        accs[name] = results["final"]["accuracy"]
    with open(os.path.join(workdir, "sweep.json")) as f:
        record = json.load(f)
    assert record["points"] == [os.path.join(*p.split("/")) for p in POINTS]
    assert record["base_config"]["num_epochs"] == 1 and record["base_config"]["max_steps"] == 2
    # The aggregate in the sweep dir shows these runs' accuracies (one seed: the mean alone).
    with open(os.path.join(workdir, "results_table.md")) as f:
        md = f.read()
    assert "| Method | 0% | 50% |" in md
    assert f"| CoOp (CE) | {100 * accs[POINTS[0]]:.1f} | {100 * accs[POINTS[2]]:.1f} |" in md
    assert f"| DSPT | {100 * accs[POINTS[1]]:.1f} | {100 * accs[POINTS[3]]:.1f} |" in md
    with open(os.path.join(workdir, "robustness_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(os.path.join(workdir, "jax_cache"))


def check_rerun_skips_everything(workdir, monkeypatch):
    monkeypatch.setattr(train, "train_and_evaluate", no_training)
    t0 = time.time()
    report = sweep.run_sweep(
        smoke_config(), workdir, ["sym"], [0.0, 0.5], ["ce", "dspt"], [1], aggregate=False
    )
    assert report.ran == [] and report.failed == [] and report.ok
    assert report.skipped == [os.path.join(*p.split("/")) for p in POINTS]
    assert time.time() - t0 < 5


def check_lost_point_is_rerun_alone(workdir, monkeypatch):
    # As after an interruption: one point has no results.json. Only that point may train again (the
    # trainer's own resume from the point's checkpoint is tested with the trainer).
    lost = os.path.join(workdir, "sym_r0.500", "ce", "seed1", "results.json")
    os.remove(lost)
    fake = FakeTrain()
    monkeypatch.setattr(train, "train_and_evaluate", fake)
    report = sweep.run_sweep(smoke_config(), workdir, ["sym"], [0.0, 0.5], ["ce", "dspt"], [1])
    assert [wd for _, wd in fake.calls] == [os.path.dirname(lost)]
    assert report.ran == [os.path.join("sym_r0.500", "ce", "seed1")] and len(report.skipped) == 3
    assert os.path.exists(lost) and report.ok
    # The new result (FakeTrain's accuracy 0.5 + 0.05 + 0.002 = 55.2 %) is in the re-aggregated table.
    with open(os.path.join(workdir, "sym_r0.000", "ce", "seed1", "results.json")) as f:
        clean = json.load(f)["final"]["accuracy"]
    with open(report.aggregate_paths["md"]) as f:
        assert f"| CoOp (CE) | {100 * clean:.1f} | 55.2 |" in f.read()


# ---------------------------------------------------------------------------------------------------------
# Foreign sub-workdirs, failures, CLIP reuse, command line (with a fake trainer: no compilation).


def test_foreign_results_are_an_error_not_a_skip(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(train, "train_and_evaluate", fake)
    base = smoke_config()
    sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], ["ce", "dspt"], [1], aggregate=False)
    assert len(fake.calls) == 2
    # Someone else's run (seed 2) in the seed-1 directory.
    path = tmp_path / "sym_r0.500" / "dspt" / "seed1" / "results.json"
    results = json.loads(path.read_text())
    results["seed"] = 2
    path.write_text(json.dumps(results))
    with pytest.raises(ValueError, match=r"dspt/seed1 holds a run of a different setting \(seed: found 2"):
        sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], ["ce", "dspt"], [1])
    # The same grid on a changed base config: its saved config.json differs.
    base.optim.lr = 0.1
    with pytest.raises(ValueError, match="optim.lr: workdir has 0.002, this run 0.1"):
        sweep.run_sweep(base, str(tmp_path), ["sym"], [0.5], ["ce"], [1])
    assert len(fake.calls) == 2


def test_failed_point_is_listed_and_the_sweep_goes_on(tmp_path, monkeypatch):
    fake = FakeTrain(fail_on={os.path.join("sym_r0.500", "ce", "seed1")})
    monkeypatch.setattr(train, "train_and_evaluate", fake)
    report = sweep.run_sweep(smoke_config(), str(tmp_path), ["sym"], [0.0, 0.5], ["ce"], [1, 2])
    assert [wd for _, wd in fake.calls] == [
        str(tmp_path / p)
        for p in ("sym_r0.000/ce/seed1", "sym_r0.500/ce/seed1", "sym_r0.000/ce/seed2", "sym_r0.500/ce/seed2")
    ]
    assert report.failed == [(os.path.join("sym_r0.500", "ce", "seed1"), "RuntimeError: boom")]
    assert len(report.ran) == 3 and not report.ok
    # The aggregate still covers what finished: rate 0 is 50.2, 50.4 (mean 50.3, sample std 0.14); rate 0.5
    # has only seed 2 (0.5 + 0.05 + 0.004).
    with open(report.aggregate_paths["md"]) as f:
        md = f.read()
    assert "| CoOp (CE) | 50.3 ± 0.1 | 55.4 |" in md


def test_clip_is_loaded_once_per_sweep(monkeypatch):
    loads = []

    def fake_load(source, *, dtype=None):
        loads.append((source, dtype))
        return object()

    monkeypatch.setattr(sweep, "load_clip", fake_load)
    cache = sweep._ClipCache()
    config = sweep.point_config(smoke_config(), sweep.make_grid(["sym"], [0.25], ["ce"], [1])[0])
    a = cache.get(config)
    b = cache.get(config)
    config.model.compute_dtype = "bfloat16"
    c = cache.get(config)
    assert a is b and a is not c
    assert [s for s, _ in loads] == ["random:tiny", "random:tiny"]


def test_command_line(tmp_path, monkeypatch, caplog):
    fake = FakeTrain()
    monkeypatch.setattr(train, "train_and_evaluate", fake)
    argv = [
        "sweep",
        f"--config={REPO / 'configs' / 'smoke.py'}",
        f"--workdir={tmp_path}",
        "--kinds=sym,asym",
        "--rates=0.25",
        "--losses=ce",
        "--seeds=2",
        "--config.num_epochs=1",
        "--config.data.shots=4",
        "--jax_cache_dir=none",
    ]  # JAX's cache is process-wide: leave it alone inside pytest
    fv = parse(argv)
    assert sweep.cli(fv) == 0
    assert [os.path.relpath(wd, tmp_path) for _, wd in fake.calls] == [
        os.path.join("sym_r0.250", "ce", "seed2"),
        os.path.join("asym_r0.250", "ce", "seed2"),
    ]
    config = fake.calls[0][0]
    assert (config.num_epochs, config.data.shots, config.model.source) == (1, 4, "random:tiny")
    assert (tmp_path / "results_table.csv").exists() and (tmp_path / "robustness_curve.png").exists()
    # A failing point makes the exit code 1.
    shutil.rmtree(tmp_path / "asym_r0.250")
    monkeypatch.setattr(
        train, "train_and_evaluate", FakeTrain(fail_on={os.path.join("asym_r0.250", "ce", "seed2")})
    )
    assert sweep.cli(fv) == 1
    # A changed base config on the same workdir (foreign sub-workdirs), or a bad flag value: exit code 2.
    # Attached directly: another test may have set propagate=False on the package logger (as the CLIs do).
    monkeypatch.setattr(logging.getLogger("dspt_jax"), "handlers", [caplog.handler])
    with caplog.at_level(logging.ERROR, logger="dspt_jax"):
        assert sweep.cli(parse(argv + ["--config.optim.lr=0.1"])) == 2
        assert (
            "sym_r0.250/ce/seed2 holds a run of a different setting (optim.lr: workdir has 0.002, this run 0.1)"
            in caplog.text.replace(os.sep, "/")
        )
        assert sweep.cli(parse(argv + ["--seeds=one"])) == 2
        assert "--seeds: 'one' is not a valid int" in caplog.text


def parse(argv):
    fv = flags.FlagValues()
    sweep.define_flags(fv, sys_argv=argv)
    fv(argv)
    return fv


def test_vectorized_sweep_resumes_after_ctrl_c_to_the_same_results(tmp_path):
    """--vectorize: the 4 points train together (runs_together 4), each in its own sub-workdir; Ctrl-C
    mid-training and the same command again end with the results of an uninterrupted vectorized sweep.
    (That runs trained together equal runs trained alone is tests/test_runs.py's.)"""
    import signal

    flags = ["--vectorize", "--config.max_steps=4", "--config.log_every_steps=1", "--config.zero_shot=False",
             "--config.checkpoint_every_steps=100000", "--aggregate=False"]
    straight = str(tmp_path / "straight")
    code, log = run_cli(straight, *flags)
    assert code == 0, log
    assert "4 ran, 0 skipped, 0 failed" in log and "(together with 3 more)" in log

    interrupted = str(tmp_path / "interrupted")
    cmd = [sys.executable, "-m", "dspt_jax.sweep", f"--workdir={interrupted}", *GRID_FLAGS, *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until the 4 runs are training together
        if " step 2/4" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130 and "Traceback" not in out, out[-2000:]
    assert not any(os.path.exists(os.path.join(interrupted, p, "results.json")) for p in POINTS)
    code, log = run_cli(interrupted, *flags)
    assert code == 0, log
    for name in POINTS:
        with open(os.path.join(straight, name, "results.json")) as f:
            want = json.load(f)
        with open(os.path.join(interrupted, name, "results.json")) as f:
            got = json.load(f)
        assert got["runs_together"] == want["runs_together"] == 4 and got["steps"] == want["steps"] == 4
        assert got["final"]["accuracy"] == want["final"]["accuracy"]
        with open(os.path.join(straight, name, "metrics.jsonl")) as f:
            want_losses = [json.loads(line)["loss"] for line in f]
        with open(os.path.join(interrupted, name, "metrics.jsonl")) as f:
            got_losses = [json.loads(line)["loss"] for line in f]
        np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)


def test_a_vectorized_sweep_into_a_bucket_skips_its_finished_points_on_rerun(tmp_path, monkeypatch):
    """A sweep whose workdir is a gs:// URL (through tests/fake_bucket.py): every point's files and the
    tables land in the bucket; a rerun reads them back and skips every point."""
    from fake_bucket import fake_gcs

    monkeypatch.chdir(tmp_path)  # a URL mistaken for a local path would appear here as ./gs:/...
    config = smoke_config()
    config.num_epochs, config.max_steps = 1, 2
    grid = dict(kinds=["sym"], rates=[0.0, 0.5], losses=["ce", "dspt"], seeds=[1])
    with fake_gcs(tmp_path / "gcs"):
        first = sweep.run_sweep(config, "gs://bucket/sweep", **grid, vectorize=True)
        again = sweep.run_sweep(config, "gs://bucket/sweep", **grid, vectorize=True)
    assert first.ok and sorted(first.ran) == sorted(POINTS) and not first.skipped, first
    assert again.ok and not again.ran and sorted(again.skipped) == sorted(POINTS), again
    assert sorted(os.listdir(tmp_path)) == ["gcs"]
    bucket = tmp_path / "gcs" / "bucket" / "sweep"
    for name in POINTS:
        assert json.load(open(bucket / name / "results.json"))["steps"] == 2
    assert {"sweep.json", "results_table.md", "robustness_curve.png"} <= set(os.listdir(bucket))
    assert first.aggregate_paths["md"] == "gs://bucket/sweep/results_table.md"
