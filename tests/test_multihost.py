"""Two JAX processes on this machine (gloo CPU collectives) train exactly like one process.

This exercises the multi-host paths a TPU pod takes: per-host data shards, global arrays built with
make_array_from_process_local_data, evaluation gathered with process_allgather, process-0-only writes.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.zero_shot=False", "--config.num_epochs=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main(workdir, *extra):
    return [
        sys.executable,
        "-m",
        "dspt_jax.main",
        "--config=configs/smoke.py",
        f"--workdir={workdir}",
        *OVERRIDES,
        *extra,
    ]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _two_processes(workdir, logdir, *extra):
    """Starts processes 0 and 1 of one run; each writes its output to a file (a pipe nobody reads could
    fill up and block a process, and with it the other one in their next collective)."""
    env = _env()
    port = _free_port()
    procs, logs = [], []
    for i in range(2):
        log_path = os.path.join(logdir, f"process{i}.log")
        with open(log_path, "w") as out:
            procs.append(
                subprocess.Popen(
                    _main(
                        workdir,
                        "--distributed",
                        f"--coordinator_address=127.0.0.1:{port}",
                        "--num_processes=2",
                        f"--process_id={i}",
                        *extra,
                    ),
                    cwd=REPO,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        logs.append(log_path)
    return procs, logs


def _finish(procs, logs, timeout):
    """Waits for every process (killing all of them if one overruns) and returns their outputs."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            p.kill()
    return [open(path).read() for path in logs]


def _signal_once_training(procs, logs, i, signum):
    """Sends `signum` to process `i` once its training is under way (step 4 logged); kills all on failure."""
    try:
        deadline = time.time() + 300
        while " step 4/" not in open(logs[i]).read():
            assert time.time() < deadline and procs[i].poll() is None, open(logs[i]).read()[-2000:]
            time.sleep(0.2)
        procs[i].send_signal(signum)
    except BaseException:
        for p in procs:
            p.kill()
        raise


def test_two_processes_match_one(tmp_path):
    two = str(tmp_path / "two")
    procs, logs = _two_processes(two, str(tmp_path))
    one = str(tmp_path / "one")
    subprocess.run(_main(one), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    for p, out in zip(procs, _finish(procs, logs, 600)):
        assert p.returncode == 0, out[-3000:]
        assert "on 2 device(s)" in out

    read = lambda d, f: [json.loads(l) for l in open(os.path.join(d, f))]
    np.testing.assert_allclose(
        [l["loss"] for l in read(two, "metrics.jsonl")],
        [l["loss"] for l in read(one, "metrics.jsonl")],
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.load(os.path.join(two, "prompt.npz"))["ctx"],
        np.load(os.path.join(one, "prompt.npz"))["ctx"],
        rtol=1e-4,
        atol=1e-6,
    )
    r1, r2 = (json.load(open(os.path.join(d, "results.json"))) for d in (one, two))
    assert r2["final"]["num_examples"] == r1["final"]["num_examples"] == 40  # every test example once
    assert r2["train"] == r1["train"]


def test_ctrl_c_on_one_host_stops_both_at_the_same_step(tmp_path):
    # On a pod, Ctrl-C may reach one host only. If that host stopped alone, it would wait forever in the
    # checkpoint save (a collective) while the other trains on: both must stop at one step and save it.
    workdir = str(tmp_path / "run")
    procs, logs = _two_processes(
        workdir,
        str(tmp_path),
        "--config.num_epochs=400",
        "--config.log_every_steps=2",
        "--config.eval_train=False",
        "--config.checkpoint_every_steps=100000",
    )
    _signal_once_training(procs, logs, 0, signal.SIGINT)
    outs = _finish(procs, logs, 240)
    stopped = []
    for p, out in zip(procs, outs):
        assert p.returncode != 0, out[-2000:]
        found = re.findall(r"Interrupted at step (\d+); checkpoint saved", out)
        assert len(found) == 1, out[-2000:]
        stopped.append(int(found[0]))
    assert stopped[0] == stopped[1] and stopped[0] % 2 == 0 and 4 <= stopped[0] < 400
    saved = {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}
    assert stopped[0] in saved


def test_sigterm_on_one_host_stops_both_at_the_same_step_and_the_rerun_finishes(tmp_path):
    """Preemption on a pod: SIGTERM reaches one host. JAX's preemption service (on after
    jax.distributed.initialize) tells the other, both save the same step and exit with 143; the same command
    then finishes the run, and its prompt is the one of an uninterrupted single-process run."""
    workdir = str(tmp_path / "run")
    extra = ("--config.num_epochs=30", "--config.log_every_steps=2", "--config.eval_train=False",
             "--config.checkpoint_every_steps=100000")
    procs, logs = _two_processes(workdir, str(tmp_path), *extra)
    _signal_once_training(procs, logs, 1, signal.SIGTERM)
    outs = _finish(procs, logs, 240)
    stopped = []
    for p, out in zip(procs, outs):
        assert p.returncode == 143, (p.returncode, out[-2000:])
        found = re.findall(r"Preempted at step (\d+); checkpoint saved", out)
        assert len(found) == 1, out[-2000:]
        stopped.append(int(found[0]))
    assert stopped[0] == stopped[1] and 4 <= stopped[0] < 120, stopped
    assert stopped[0] in {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}

    rerun_logs = tmp_path / "rerun"
    rerun_logs.mkdir()
    procs, logs = _two_processes(workdir, str(rerun_logs), *extra)
    for p, out in zip(procs, _finish(procs, logs, 600)):
        assert p.returncode == 0, out[-3000:]
        assert f"at step {stopped[0]}" in out  # resumed where both stopped
    one = str(tmp_path / "one")
    subprocess.run(_main(one, *extra), cwd=REPO, env=_env(), check=True, capture_output=True, timeout=600)
    np.testing.assert_allclose(np.load(os.path.join(workdir, "prompt.npz"))["ctx"],
                               np.load(os.path.join(one, "prompt.npz"))["ctx"], rtol=1e-4, atol=1e-6)
