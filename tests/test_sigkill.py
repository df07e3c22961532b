"""Killed at any moment (issue 12, item 1): a run killed with SIGKILL from outside, at seeded random moments of
each of its phases, and restarted with the same command each time, finishes with the same results.json
(timings aside), the same prompt and the same metrics.jsonl records as a run that was never stopped.

Two subprocesses train the tiny random CLIP on the toy data (configs/smoke.py, with a training-feature cache,
an evaluation every epoch and a checkpoint every 2 steps): a clean one, and beside it a series of the same run
in another workdir, each killed with SIGKILL (which no handler can see) at a random delay after a phase of
its own began, then started again, until one run finishes. The driver only prints a marker line as each phase
begins (`@@ <phase> <seconds>`); the kills come from this process, at moments the run cannot anticipate.

The fields compared leave out only wall-clock measurements: `TIMING_FIELDS` of results.json and
`TIMING_METRICS` of metrics.jsonl. Set DSPT_SIGKILL_SEED to draw other moments.
"""

import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
from conftest import without_compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("DSPT_SIGKILL_SEED", "20240612"))

# results.json fields that measure time, not what was computed: they differ between any two runs.
TIMING_FIELDS = {
    "wall_time_s",  # the run's wall-clock time (of the last process, for the killed run)
    "train_loop_s",  # the training loop's wall-clock time
    "input_wait_fraction",  # share of that time spent waiting for batches
}
# metrics.jsonl fields that measure time: the record's timestamp, the step rate, the input wait.
TIMING_METRICS = {"time", "steps_per_sec", "input_wait_fraction"}

OVERRIDES = {
    "image_features": "cached",  # the training-feature cache is a phase (and a file) of its own
    "eval_every_epochs": 1,  # per-epoch evaluations: in metrics.jsonl and results.json's epoch_evals
    "log_every_steps": 1,
    "checkpoint_every_steps": 2,  # checkpoints often, so that kills land on checkpoint writes
}

# The run: markers at the start of each phase, then the smoke config with OVERRIDES. The wrappers change
# nothing the run does; they only say when each phase begins.
DRIVER = textwrap.dedent(
    """
    import os, sys, time
    START = time.time()

    def mark(name):
        print(f"@@ {name} {time.time() - START:.3f}", flush=True)

    mark("start")
    sys.path[:0] = [__REPO__, os.path.join(__REPO__, "configs")]  # this checkout's code, whatever is installed
    import smoke
    from dspt_jax import checkpointing, features, train

    def marked(owner, name, label):
        real = getattr(owner, name)  # AttributeError: a phase was renamed; update the test

        def wrapper(*args, **kwargs):
            mark(label(*args, **kwargs) if callable(label) else label)
            return real(*args, **kwargs)

        setattr(owner, name, wrapper)

    marked(train, "zero_shot_phase", "zero_shot")
    marked(train, "training_features", "features")
    marked(features, "save", "features_save")
    marked(checkpointing.Checkpointer, "save", lambda self, step, *a, **k: f"checkpoint {step}")
    marked(train, "evaluate_phase", "final_eval")
    marked(train, "_write_json", lambda path, obj: "write " + os.path.basename(path))
    config = smoke.get_config()
    config.update(__OVERRIDES__)
    train.train_and_evaluate(config, sys.argv[1])
    mark("done")
    """
)


def _phase(marker: str) -> str:
    """The phase of the run that the last marker before a kill began."""
    return {
        "start": "start-up",
        "write config.json": "start-up",
        "zero_shot": "zero-shot",
        "write zero_shot.json": "zero-shot",
        "features": "feature cache",
        "features_save": "feature cache",
        "final_eval": "final evaluation",
        "write results.json": "results write",
        "done": "exit",
    }.get(marker, "training" if marker.startswith("checkpoint") else marker)


class _Run:
    """One process of the driver; a thread reads its output: (arrival time, line) of every line, and a queue
    of the lines for `wait_for`."""

    def __init__(self, driver: str, workdir: str, env: dict):
        self.started = time.time()
        self.proc = subprocess.Popen(
            [sys.executable, driver, workdir], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
            self._queue.put(line)
        self._queue.put(None)  # the process closed its output: it ended

    def wait_for(self, tests, timeout: float = 300) -> bool:
        """Blocks until a line passing tests[0] is printed, then one passing tests[1], and so on; False if
        the run ended first."""
        deadline = time.time() + timeout
        for test in tests:
            while True:
                line = self._queue.get(timeout=max(0.0, deadline - time.time()))
                if line is None:
                    return False
                if test(line):
                    break
        return True

    def kill(self) -> tuple[bool, str]:
        """SIGKILL now; (whether it killed a live run, the name of the last marker printed before it)."""
        self.proc.send_signal(signal.SIGKILL)  # nothing once the process has been reaped
        at = time.time()
        rc = self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        before = [line[3:].rsplit(" ", 1)[0] for t, line in self.lines if t <= at and line.startswith("@@ ")]
        return rc == -signal.SIGKILL, before[-1] if before else "(none)"

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=60)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _marker(name: str):
    return lambda line: line.startswith(f"@@ {name} ")


def _checkpoint_at_least(step: int):
    return lambda line: line.startswith("@@ checkpoint ") and int(line.split()[2]) >= step


def _training_line(line: str) -> bool:
    """The trainer's progress line of a step ("step 5/12  epoch 2/3  loss ...")."""
    return re.search(r" step \d+/\d+ ", line) is not None


def _kill_plan(rng) -> list[tuple[str, list, float]]:
    """(the phase aimed at, the lines to wait for in turn, the seconds to wait after the last), seeded. The
    lines only say where each process is, so that a kill lands in each phase whatever the machine's speed;
    the moment within the phase is random."""
    early = [  # imports, CLIP, the task, config.json: a moment of the first seconds; or zero-shot evaluation
        ("start-up", [_marker("start")], float(rng.uniform(0.5, 6.0))),
        ("zero-shot", [_marker("zero_shot")], float(rng.uniform(0, 2.5))),
    ]
    return [
        early[rng.integers(2)],
        # The training-feature cache: encoding the training images, its file, then the start of training.
        ("feature cache", [_marker("features")], float(rng.uniform(0, 0.4))),
        # Training: once a checkpoint write has begun (orbax writes it in a background thread) and the next
        # step is logged, so that the resumed run has records after its checkpoint to drop.
        ("training / checkpoint write", [_checkpoint_at_least(int(rng.choice([2, 4, 6, 8]))), _training_line],
         float(rng.uniform(0, 0.1))),
        # After training: prompt.npz, the final evaluations, results.json.
        ("final evaluation / results", [_marker("final_eval")], float(rng.uniform(0, 0.6))),
    ]


def _leftovers(workdir: str) -> list[str]:
    """Signs that a kill cut a write short: unfinished orbax checkpoints, temporary files, a partial line."""
    found = []
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            if ".orbax-checkpoint-tmp" in name or ".tmp" in name:
                found.append(os.path.relpath(os.path.join(root, name), workdir))
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path) and os.path.getsize(metrics_path):
        with open(metrics_path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read() != b"\n":
                found.append("a partial line in metrics.jsonl")
    return sorted(found)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _flat(tree, prefix=""):
    """{dotted key: leaf} of nested dicts and lists (list items keyed by their index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _killed_series(driver: str, workdir: str, env: dict, rng, runs: list) -> list[tuple]:
    """Runs the driver in `workdir`, kills it as `_kill_plan` says, restarting it with the same command after
    each kill, then lets a last run finish. Returns per kill: (the phase aimed at, the last marker before the
    kill, seconds into its process, what the kill left behind). Every process started is added to `runs`."""
    kills = []
    for what, tests, delay in _kill_plan(rng):
        run = _Run(driver, workdir, env)
        runs.append(run)
        if not run.wait_for(tests):  # the run finished before the phase: nothing left to kill
            assert run.finish() == 0, run.output[-3000:]
            break
        time.sleep(delay)
        killed, last = run.kill()
        if killed:
            kills.append((what, last, round(time.time() - run.started, 1), _leftovers(workdir)))
        else:  # it ended on its own within the delay
            assert run.proc.returncode == 0, run.output[-3000:]
    final = _Run(driver, workdir, env)
    runs.append(final)
    assert final.finish() == 0, final.output[-3000:]
    return kills


def test_sigkill_at_random_moments_then_restart_gives_the_clean_results(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.replace("__REPO__", repr(REPO)).replace("__OVERRIDES__", repr(OVERRIDES)))
    env = dict(without_compilation_cache(os.environ), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, whatever the caller set
    clean_dir, killed_dir = str(tmp_path / "clean"), str(tmp_path / "killed")
    # The restarts share a JAX compilation cache: each one compiles less, so the test is shorter. The clean
    # run compiles afresh, so the comparison also covers executables read from that cache.
    killed_env = dict(env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    start = time.time()
    cpu_before = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    clean = _Run(str(driver), clean_dir, env)  # beside the killed series: on two cores it costs little time
    runs = [clean]
    try:
        kills = _killed_series(str(driver), killed_dir, killed_env, np.random.default_rng(SEED), runs)
        assert clean.finish() == 0, clean.output[-3000:]
    finally:  # a failure leaves no process of this test running
        for run in runs:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
    cpu = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]) - cpu_before
    report = "\n".join(
        f"  kill {i + 1} (aimed at {what}): {t}s into its process, after marker {last!r} ({_phase(last)}); "
        f"left behind: {', '.join(cut) or 'nothing'}"
        for i, (what, last, t, cut) in enumerate(kills)
    )
    print(f"\nSIGKILL seed {SEED}: {len(kills)} kills survived; {time.time() - start:.0f}s wall, {cpu:.0f}s CPU "
          f"of all runs\n{report}")
    # The kills landed on live runs (the last may find its run ended), in three phases or more; the next run
    # cleared any checkpoint write they cut short.
    assert len(kills) >= 3, report
    assert len({_phase(last) for _, last, _, _ in kills}) >= 3, report
    assert not any(".orbax-checkpoint-tmp" in name for name in _leftovers(killed_dir)), report

    # results.json: every field equal but the timings (a path naming its workdir would differ too); no value
    # names the test's directory, under which both workdirs lie.
    want = json.load(open(os.path.join(clean_dir, "results.json")))
    got = json.load(open(os.path.join(killed_dir, "results.json")))
    assert set(want) == set(got)
    for field in sorted(set(want) - TIMING_FIELDS):
        assert _flat(got[field]) == _flat(want[field]), (field, report)
    for key, value in _flat(got).items():
        assert not (isinstance(value, str) and str(tmp_path) in value), (key, value)

    # The final prompt, bit for bit, and the arrays saved with it.
    with np.load(os.path.join(clean_dir, "prompt.npz")) as a, np.load(os.path.join(killed_dir, "prompt.npz")) as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            assert np.array_equal(a[name], b[name]), (name, report)

    # metrics.jsonl: the same records in the same order, each step once; timings aside.
    def records(workdir):
        return [{k: v for k, v in r.items() if k not in TIMING_METRICS}
                for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl"))]

    want_records, got_records = records(clean_dir), records(killed_dir)
    assert [r["step"] for r in got_records] == [r["step"] for r in want_records], report
    assert got_records == want_records, report

    # What resumed runs read back equals what the clean run computed.
    for name in ("zero_shot.json", "config.json"):
        assert json.load(open(os.path.join(clean_dir, name))) == json.load(open(os.path.join(killed_dir, name)))
    (record,) = os.listdir(os.path.join(clean_dir, "noise"))
    assert open(os.path.join(clean_dir, "noise", record)).read() == open(
        os.path.join(killed_dir, "noise", record)).read()
    with np.load(os.path.join(clean_dir, "features", "train_cached.npz")) as a, np.load(
            os.path.join(killed_dir, "features", "train_cached.npz")) as b:
        assert np.array_equal(a["features"], b["features"]) and str(a["key"]) == str(b["key"])
