"""The launch scripts: every argument reaches dspt_jax.main as exactly one argv entry (through gcloud's
--command and the worker's shell for the TPU pod), and a short command line prints the whole usage text.

gcloud and python/python3 are stubs on PATH: the stub gcloud runs its --command with a local shell, as the
worker's login shell would, and the stub python records its argv (NUL-separated) and working directory."""

import os
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")

# Each must arrive unchanged: spaces, both quotes, shell expansions, brackets, separators, globs, newlines.
TRICKY = [
    "--config.prompt.ctx_init=a photo of a",
    "--config.name=it's \"quoted\"",
    "--config.note=$HOME ${HOME} `id` $(id) \\ \\'",
    "--config.noise.matrix=[[0.5,0.5],[0.5,0.5]]",
    "--config.x=a; b && c | d > out <in &",
    "--config.glob=* ~ ?",
    "--config.text=two\nlines",
    "",
]
CONFIG = "configs/my 'caltech'.py"
WORKDIR = "/mnt/shared/runs/a b;$USER"

GCLOUD = """#!{bash}
printf '%s\\0' "$@" > "$STUB_DIR/gcloud.args"
while [ $# -gt 0 ]; do
  case $1 in --command) cmd=$2; shift ;; --command=*) cmd=${{1#--command=}} ;; esac
  shift
done
exec "$REMOTE_SHELL" -c "$cmd"
"""
PYTHON = """#!{bash}
pwd > "$STUB_DIR/python.pwd"
printf '%s\\0' "$@" > "$STUB_DIR/python.args"
printf '%s' "${{XLA_PYTHON_CLIENT_MEM_FRACTION-unset}}" > "$STUB_DIR/python.xla"
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("gcloud", GCLOUD), ("python3", PYTHON), ("python", PYTHON)]:
        (bin_dir / name).write_text(text.format(bash=BASH))
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    (home / "dspt_jax").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", HOME=str(home), STUB_DIR=str(tmp_path),
               REMOTE_SHELL=BASH)
    return tmp_path, env


def run(script, args, env):
    return subprocess.run([str(LAUNCH / script), *args], env=env, capture_output=True, text=True, timeout=30)


def read_args(path):
    return path.read_text().split("\0")[:-1]


def header(script):
    """The script's header comment (after the shebang), with the comment markers taken off."""
    lines = (LAUNCH / script).read_text().splitlines()[1:]
    lines = lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    return [line[2:] if line.startswith("# ") else line[1:] for line in lines]


# sh is dash on Debian/Ubuntu: the quoting must not rely on bash-only syntax such as $'...'.
@pytest.mark.parametrize("remote_shell", sorted({BASH, shutil.which("sh") or BASH}))
def test_tpu_pod_passes_every_argument_intact(stubs, remote_shell):
    tmp, env = stubs
    env["REMOTE_SHELL"] = remote_shell
    result = run("tpu_pod.sh", ["my-tpu", "us-central2-b", CONFIG, WORKDIR, *TRICKY], env)
    assert result.returncode == 0, result.stderr

    gcloud = read_args(tmp / "gcloud.args")
    assert gcloud[: gcloud.index("--command")] == [
        "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b", "--worker=all"]
    assert read_args(tmp / "python.args") == [
        "-m", "dspt_jax.main", "--distributed", f"--config={CONFIG}", f"--workdir={WORKDIR}", *TRICKY]
    assert (tmp / "python.pwd").read_text().strip() == os.path.realpath(tmp / "home" / "dspt_jax")


def test_multi_gpu_passes_every_argument_intact(stubs):
    tmp, env = stubs
    result = run("multi_gpu.sh", [CONFIG, WORKDIR, *TRICKY], env)
    assert result.returncode == 0, result.stderr
    assert read_args(tmp / "python.args") == [
        "-m", "dspt_jax.main", f"--config={CONFIG}", f"--workdir={WORKDIR}", *TRICKY]
    assert (tmp / "python.xla").read_text() == "0.9"


LAST_WORDS = {"tpu_pod.sh": "(at most DSPT_JAX_MAX_RESTARTS times, default 3).",
              "multi_gpu.sh": "(at most DSPT_JAX_MAX_RESTARTS times, default 3)."}


@pytest.mark.parametrize("script, args", [
    ("tpu_pod.sh", []), ("tpu_pod.sh", ["my-tpu", "zone", "configs/caltech.py"]),
    ("multi_gpu.sh", []), ("multi_gpu.sh", ["configs/caltech.py"]),
])
def test_usage_is_the_whole_header(stubs, script, args):
    tmp, env = stubs
    result = run(script, args, env)
    assert result.returncode == 2
    assert result.stdout + result.stderr == "\n".join(header(script)) + "\n"
    assert not (tmp / "gcloud.args").exists() and not (tmp / "python.args").exists()
    # The header's last words: the old fixed line range (sed -n 2,8p) cut tpu_pod.sh's usage mid-sentence.
    assert result.stderr.rstrip().endswith(LAST_WORDS[script])


@pytest.mark.parametrize("script, args", [("multi_gpu.sh", [CONFIG, WORKDIR]),
                                          ("tpu_pod.sh", ["tpu", "zone", CONFIG, WORKDIR])])
def test_a_preempted_run_is_rerun_with_the_same_command(stubs, script, args):
    """Exit 143 (SIGTERM, checkpoint saved) reruns the identical command, up to DSPT_JAX_MAX_RESTARTS
    times; any other status ends the script with that status."""
    tmp, env = stubs
    counter = tmp / "calls"
    stub = (f"#!{BASH}\nprintf '%s\\0' \"$@\" >> \"$STUB_DIR/all.args\"; printf x >> {counter}\n"
            f"[ $(wc -c < {counter}) -le 2 ] && exit 143; exit 7\n")
    for name in ("python", "python3"):
        (tmp / "bin" / name).write_text(stub)
    proc = run(script, args, env)
    assert proc.returncode == 7 and counter.read_text() == "xxx", proc.stderr
    assert proc.stderr.count("preempted (exit 143)") == 2
    calls = (tmp / "all.args").read_text().split("\0")[:-1]
    assert len(calls) % 3 == 0 and calls[: len(calls) // 3] * 3 == calls  # the same argv each time
    (tmp / "all.args").unlink()
    counter.unlink()
    proc = run(script, args, dict(env, DSPT_JAX_MAX_RESTARTS="1"))
    assert proc.returncode == 143 and counter.read_text() == "xx"
