"""OpenAI's own CLIP `model.py` (MIT licence), the oracle of the OpenAI-format backbones.

It ships in the `clip-anytorch` wheel, imports only torch and numpy, and is loaded here by path: the wheel
is fetched once with `pip download --no-deps` (the package index is the only network the suite uses) into
`CACHE_DIR`, its SHA-256 checked, and `clip/model.py` extracted. A failed download fails the
tests that need it, with pip's message: an oracle that cannot be reached is not a pass.
"""

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

import pytest

# Outside the project cache, which the suite makes fresh per session: downloaded once per machine.
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dspt_jax_test_oracles")
WHEEL = "clip_anytorch-2.6.0-py3-none-any.whl"
WHEEL_SHA256 = "ebc0afed243851b9dc7e16ab8afb665237e8a5838986e97cd99f123ae4ce94ce"


def model_py(cache_dir: str) -> str:
    """Path of OpenAI's model.py under `cache_dir`, downloading the wheel on first use."""
    path = os.path.join(cache_dir, "clip_anytorch_2.6.0_model.py")
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
             "clip-anytorch==2.6.0", "-d", tmp],
            capture_output=True, text=True, timeout=600,
        )
        wheel = os.path.join(tmp, WHEEL)
        if proc.returncode or not os.path.isfile(wheel):
            pytest.fail(f"could not download the oracle (OpenAI's model.py in clip-anytorch):\n{proc.stderr[-2000:]}")
        with open(wheel, "rb") as f:
            got = hashlib.sha256(f.read()).hexdigest()
        if got != WHEEL_SHA256:
            pytest.fail(f"{WHEEL}: SHA-256 {got}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            source = z.read("clip/model.py")
        staged = os.path.join(tmp, "model.py")
        with open(staged, "wb") as f:
            f.write(source)
        os.replace(staged, path)  # atomic: parallel test workers may race here
    return path


def load_model_module(cache_dir: str):
    spec = importlib.util.spec_from_file_location("openai_clip_model", model_py(cache_dir))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
