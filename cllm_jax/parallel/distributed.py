"""Multi-host start-up and the split of every global batch between processes.

With `distributed.enabled`, `jax.distributed.initialize` runs before anything touches a device;
then `jax.devices()` lists the devices of every process and one mesh spans them all. Each process
builds only the rows of a global batch that its own devices hold (`process_rows`), and
`jax.make_array_from_process_local_data` joins them into one global array. The same code path runs
with a single process, where the local rows are the whole batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from cllm_jax.errors import ConfigError

_initialized = False


def initialize(enabled: bool, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize once per process when enabled (arguments left None are detected)."""
    global _initialized
    if not enabled or _initialized:
        return
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"jax.distributed.initialize failed ({e}); check distributed.coordinator, "
                          f"num_processes and process_id") from None
    _initialized = True


def is_main_process() -> bool:
    return jax.process_index() == 0


def process_rows(sharding: Sharding, global_shape: tuple[int, ...], axis: int = 1) -> slice:
    """The contiguous range of `axis` held by this process's devices under `sharding`."""
    index_map = sharding.addressable_devices_indices_map(tuple(global_shape))
    starts, stops = [], []
    for index in index_map.values():
        part = index[axis]
        starts.append(part.start or 0)
        stops.append(global_shape[axis] if part.stop is None else part.stop)
    start, stop = min(starts), max(stops)
    covered = np.zeros(stop - start, bool)
    for a, b in zip(starts, stops):
        covered[a - start:b - start] = True
    if not covered.all():
        raise ConfigError("this process's devices hold a non-contiguous part of the batch; "
                          "order the mesh devices by process")
    return slice(start, stop)


def global_array(local: np.ndarray, sharding: Sharding, global_shape: tuple[int, ...]) -> jax.Array:
    """One global jax.Array from this process's rows (all rows when there is one process)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def to_host(tree):
    """Numpy copies of the global values of a (possibly sharded, multi-host) pytree of arrays.

    Collective when some array spans processes: every process must call it."""

    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
