"""Two JAX processes on this machine (gloo CPU collectives) train exactly like one process.

This exercises the multi-host paths a TPU pod takes: per-host data shards, global arrays built with
make_array_from_process_local_data, evaluation gathered with process_allgather, process-0-only writes.
"""

import json
import os
import socket
import subprocess
import sys

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


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    two = str(tmp_path / "two")
    procs = [
        subprocess.Popen(
            _main(
                two,
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    one = str(tmp_path / "one")
    subprocess.run(_main(one), cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    for p in procs:
        out, _ = p.communicate(timeout=600)
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
