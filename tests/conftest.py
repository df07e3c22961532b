"""Suite-wide setup.

* The project cache ($DSPT_JAX_CACHE) of every test, and of the processes tests start, is a fresh temporary
  directory, so the suite never reads or writes ~/.cache/dspt_jax.
* JAX's persistent compilation cache is on for the whole run, in one fresh directory shared by the xdist
  workers and every process a test starts: the tests train the same tiny models again and again, and a
  smoke run that compiles in about 20 s loads its programs in about 1 s. (A cache entry is the compiled
  program of the same HLO and options; an entry being written while another process reads it is an unreadable
  entry, which JAX recompiles with a warning.) Tests about the cache itself unset it for their processes.
"""

import os

import jax
import pytest

COMPILATION_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def _session_root(tmp_path_factory):
    """The run's temporary root: shared by the xdist workers (each has its own basetemp below it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    cache = _session_root(tmp_path_factory) / "jax_compilation_cache"
    cache.mkdir(exist_ok=True)
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), **COMPILATION_CACHE_ENV}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the processes tests start
    jax.config.update("jax_compilation_cache_dir", str(cache))  # this process (jax read its env at import)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def without_compilation_cache(env: dict) -> dict:
    """`env` for a process that must choose its own compilation cache (or compile afresh)."""
    return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR" and k not in COMPILATION_CACHE_ENV}


@pytest.fixture(scope="session", autouse=True)
def _private_project_cache(tmp_path_factory):
    old = os.environ.get("DSPT_JAX_CACHE")
    os.environ["DSPT_JAX_CACHE"] = str(tmp_path_factory.mktemp("dspt_jax_cache"))
    yield
    if old is None:
        os.environ.pop("DSPT_JAX_CACHE", None)
    else:
        os.environ["DSPT_JAX_CACHE"] = old
