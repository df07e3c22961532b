"""Suite-wide setup: the project cache ($DSPT_JAX_CACHE) of every test, and of the processes tests start,
is a fresh temporary directory, so the suite never reads or writes ~/.cache/dspt_jax."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_project_cache(tmp_path_factory):
    old = os.environ.get("DSPT_JAX_CACHE")
    os.environ["DSPT_JAX_CACHE"] = str(tmp_path_factory.mktemp("dspt_jax_cache"))
    yield
    if old is None:
        os.environ.pop("DSPT_JAX_CACHE", None)
    else:
        os.environ["DSPT_JAX_CACHE"] = old
