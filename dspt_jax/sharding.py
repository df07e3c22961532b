"""The device mesh and shardings: one `"data"` axis; batches are split over it, CLIP and prompt replicated.

The same code runs on 1 CPU, 8 GPUs or a TPU pod: every process feeds its local slice of the global batch
and `jax.make_array_from_process_local_data` stitches the global `jax.Array`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def run_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches of R runs trained together, [R, B, ...]: each run's examples split over the data axis."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"{what}={global_batch_size} is not divisible by the {n} devices of the mesh.")
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"{what}={global_batch_size} is not divisible by the {jax.process_count()} processes."
        )


def to_global(local_batch: dict, mesh: Mesh, sharding: NamedSharding | None = None) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the data axis
    (`sharding`: default `batch_sharding`; `run_batch_sharding` for [R, B, ...] batches)."""
    sharding = batch_sharding(mesh) if sharding is None else sharding
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }


def replicate(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(mesh))


def gather(x) -> np.ndarray:
    """A global jax.Array, whole, on every host (a replicated one is read from a local copy)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    if isinstance(x, jax.Array) and x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
