"""The command lines' console: progress lines only by default, TensorFlow's INFO lines back with --verbosity,
and a run refused for its input as one message (exit status 1), its traceback only with --debug_tracebacks.

Four command lines run as subprocesses, side by side (each starts JAX, two import TensorFlow, ~10 s of CPU
each at least): a tiny real run, two refused runs of `dspt_jax.main` and a refused sweep. The rest of
`dspt_jax.cli` is tested in this process."""

import logging
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from conftest import without_compilation_cache

from dspt_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What TensorFlow and absl's C++ logging print at start-up when nobody sets their level.
NOISE = ("oneDNN custom operations", "absl::InitializeLog()", "cpu_feature_guard")
# An INFO line of absl's C++ or Python logging: "I1201 02:43:26.354 140412459760512 file.py:701] ...".
INFO_LINE = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.MULTILINE)
PROGRESS_LINE = re.compile(r"^\d\d:\d\d:\d\d ")  # the dspt_jax logger's format


def start(module, *args) -> subprocess.Popen:
    """`python -m module *args` as a user's shell would start it (no TF_CPP_MIN_LOG_LEVEL set)."""
    env = {k: v for k, v in without_compilation_cache(os.environ).items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def smoke(workdir, *overrides):
    return ["--config=configs/smoke.py", f"--workdir={workdir}", *overrides]


def test_command_lines_console(tmp_path):
    # One test, not four: the processes run side by side (most of each is single-threaded start-up), and
    # under pytest-xdist a shared fixture would start them once per worker.
    missing = tmp_path / "no_such_images"
    procs = {
        "run": start(
            "dspt_jax.main",
            *smoke(tmp_path / "run", "--config.max_steps=0", "--config.zero_shot=False", "--config.eval_train=False"),
        ),
        "bad_value": start("dspt_jax.main", *smoke(tmp_path / "bad_value", "--config.noise.rate=1.5")),
        "verbose_debug": start(
            "dspt_jax.main",
            *smoke(tmp_path / "verbose_debug", "--config.data.name=folder", f"--config.data.folder={missing}"),
            "--verbosity=0",
            "--debug_tracebacks",
        ),
        "sweep": start("dspt_jax.sweep", *smoke(tmp_path / "sweep", "--rates=1.5")),
    }
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            done[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    check_a_run_prints_its_progress_lines_only(*done["run"])
    check_a_bad_config_value_is_one_message(*done["bad_value"], tmp_path / "bad_value")
    check_verbosity_and_debug_bring_back_info_lines_and_traceback(*done["verbose_debug"], missing)
    check_the_sweep_refuses_a_bad_grid_with_a_message(*done["sweep"])


def check_a_run_prints_its_progress_lines_only(code, out, err):
    both = out + err
    assert code == 0, both[-3000:]
    assert not [n for n in NOISE if n in both], both[-3000:]
    assert not INFO_LINE.search(both), both[-3000:]  # nor orbax's or JAX's INFO lines
    lines = out.splitlines()
    assert lines and all(PROGRESS_LINE.match(line) for line in lines), out
    assert any("Tuned prompt (dspt): test accuracy" in line for line in lines), out


def check_a_bad_config_value_is_one_message(code, out, err, workdir):
    assert code == 1, out + err
    assert "Traceback" not in out + err, err
    error = err.strip().splitlines()
    assert error[0].startswith("Error: noise.rate must be in [0, 1]") and "1.5" in error[0], err
    assert "--debug_tracebacks" in error[-1], err
    assert not workdir.exists()  # refused before anything was written


def check_verbosity_and_debug_bring_back_info_lines_and_traceback(code, out, err, missing):
    assert code == 1, (out + err)[-3000:]  # the status of a refusal, traceback or not
    # The missing folder is found by the data pipeline's check, after TensorFlow is imported.
    assert "Traceback (most recent call last)" in err and "InputsNotFoundError" in err, err[-3000:]
    assert f"folder {missing} does not exist" in err, err[-3000:]
    # TensorFlow's INFO notice at import names the CPU instructions it was not built with (AVX2 or FMA on
    # any CPU that has them), so it is printed wherever those are.
    if {"avx2", "fma"} & cpu_flags():
        assert "cpu_feature_guard" in out + err, (out + err)[-3000:]


def cpu_flags() -> set[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as f:
        return set(f.read().split())


def check_the_sweep_refuses_a_bad_grid_with_a_message(code, out, err):
    both = out + err
    assert code == 2, both  # the sweep's status for an invalid grid (docs/SWEEPS.md)
    assert "error: noise.rate must be in [0, 1]" in both and "Traceback" not in both, both
    assert not [n for n in NOISE if n in both], both


# ---------------------------------------------------------------------------------------------------------
# dspt_jax.cli in this process.


def parsed_flags(*argv):
    fv = flags.FlagValues()
    cli.define_flags(fv)
    cli.define_flags(fv)  # a second definition (both command lines in one process) is a no-op
    fv(["prog", *argv])
    return fv


def test_refusals_and_bugs(capsys):
    quiet = parsed_flags()
    with pytest.raises(SystemExit) as stop:
        with cli.reporting_refusals("rerun.", quiet):
            raise ValueError("config.loss: unknown loss 'x'")
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Error: config.loss: unknown loss 'x'" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stop:
        with cli.reporting_refusals("rerun.", parsed_flags("--debug_tracebacks")):
            raise FileNotFoundError("split file /x.json not found")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback (most recent call last)" in err and "/x.json" in err
    with pytest.raises(TypeError):  # a bug keeps its traceback
        with cli.reporting_refusals("rerun.", quiet):
            raise TypeError("unsupported operand")


def test_project_errors_are_refusals_others_are_not():
    from dspt_jax.data.prepare import NoNetworkError  # a ConnectionError, the project's own

    assert cli.is_refusal(NoNetworkError("no network")) and cli.is_refusal(ValueError())
    assert cli.is_refusal(FileNotFoundError()) and not cli.is_refusal(RuntimeError())
    assert not cli.is_refusal(KeyError("x")) and not cli.is_refusal(PermissionError())


def test_ctrl_c_statuses(capsys):
    class Interrupted(KeyboardInterrupt):  # as train.TrainingInterrupted: it carries its status
        exit_status = 143

    with pytest.raises(SystemExit) as stop:
        with cli.reporting_refusals("rerun.", parsed_flags()):
            raise Interrupted()
    assert stop.value.code == 143 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:
        with cli.reporting_refusals("rerun the same command.", parsed_flags()):
            raise KeyboardInterrupt()
    assert stop.value.code == 130
    assert capsys.readouterr().err == "Aborted (Ctrl-C); rerun the same command.\n"


def test_native_log_level_follows_verbosity():
    assert cli.native_log_level(None) == "1"  # default: TensorFlow's warnings and errors, no INFO
    assert [cli.native_log_level(v) for v in (2, 1, 0, -1, -2, -3, -9)] == ["0", "0", "0", "1", "2", "3", "3"]


def test_tensorflow_ops_on_one_thread_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("TF_NUM_INTRAOP_THREADS", raising=False)
    cli.one_thread_per_tensorflow_op()
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "1"
    monkeypatch.setenv("TF_NUM_INTRAOP_THREADS", "4")
    cli.one_thread_per_tensorflow_op()
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "4"


def test_sweep_debug_flag_logs_the_traceback(tmp_path, monkeypatch, caplog):
    from dspt_jax import sweep

    argv = ["sweep", f"--config={os.path.join(REPO, 'configs', 'smoke.py')}", f"--workdir={tmp_path}"]
    argv += ["--rates=1.5", "--jax_cache_dir=none"]  # JAX's cache is process-wide: leave it alone here

    def parse(extra):
        fv = flags.FlagValues()
        sweep.define_flags(fv, sys_argv=argv + extra)
        fv(argv + extra)
        return fv

    # Attached directly: the command lines set propagate=False on the package logger.
    monkeypatch.setattr(logging.getLogger("dspt_jax"), "handlers", [caplog.handler])
    with caplog.at_level(logging.ERROR, logger="dspt_jax"):
        assert sweep.cli(parse([])) == 2
        assert not caplog.records[-1].exc_info
        assert sweep.cli(parse(["--debug_tracebacks"])) == 2
        assert caplog.records[-1].exc_info and "Traceback" in caplog.text
