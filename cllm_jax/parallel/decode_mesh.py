"""Decoding on a (data, tensor) device mesh with the training mesh's logical-axis rules.

Weights go where training puts them (heads, kv heads, MLP and vocabulary over `tensor`), the KV cache
over rows (`data`) and kv heads (`tensor`), prompts and every per-row output over `data`. Nothing in
a decoding method knows about the mesh: the engine hands the jitted method sharded arguments and
fixes the output shardings, and XLA partitions the `lax.while_loop` inside. So a new method decodes
on a mesh with nothing added.

A heads axis is split only at whole heads (a head split across devices would make every attention
step gather it), and any dimension the mesh does not divide stays replicated, as in training; the
command says once which ones. `--mesh` is `data=D,tensor=T`; an axis left out fills in the rest of
the devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import warnings

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cllm_jax.errors import CllmWarning, ConfigError, InputError
from cllm_jax.model.interface import param_axes
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.parallel import mesh as mesh_lib
from cllm_jax.parallel.mesh import DEFAULT_RULES, param_name

DECODE_AXES = ("data", "tensor")
_active: Mesh | None = None
_said: set[str] = set()  # replication notes already printed (one line per command, not per decoder)


def parse_mesh(text: str) -> tuple[int, int]:
    """'data=2,tensor=4' -> (2, 4); an axis left out is -1 (fill in), tensor alone leaves data -1."""
    sizes: dict[str, int] = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in DECODE_AXES or name in sizes:
            raise InputError(f"--mesh '{text}' is not of the form data=D,tensor=T (e.g. data=2,tensor=4)")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise InputError(f"--mesh '{text}': {name}={value.strip()} is not an integer") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise InputError(f"--mesh '{text}': {name} must be >= 1 (or -1: the rest of the devices)")
    if not sizes:
        raise InputError(f"--mesh '{text}' names no axis: give data=D,tensor=T")
    if len(sizes) == 1:
        sizes.setdefault("data", -1 if "tensor" in sizes else sizes["data"])
        sizes.setdefault("tensor", -1)
    return sizes["data"], sizes["tensor"]


def make_decode_mesh(data: int = -1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp=1, tensor) mesh: the training mesh's axes, so its rules apply unchanged."""
    try:
        return mesh_lib.make_mesh(data, 1, tensor, devices=devices)
    except ConfigError as error:
        raise InputError(f"--mesh data={data},tensor={tensor}: {error}") from None


def mesh_from_text(text: str | None, devices=None) -> Mesh | None:
    return None if not text else make_decode_mesh(*parse_mesh(text), devices=devices)


def activate(mesh: Mesh | None) -> None:
    """Every Decoder built from now on decodes on `mesh` (None: one device)."""
    global _active
    _active = mesh


def active() -> Mesh | None:
    return _active


@contextlib.contextmanager
def using(mesh: Mesh | None):
    previous = _active
    activate(mesh)
    try:
        yield mesh
    finally:
        activate(previous)


def describe(mesh: Mesh) -> str:
    return f"data={mesh.shape['data']},tensor={mesh.shape['tensor']}"


# --- placement ----------------------------------------------------------------------------------


def _head_counts(config) -> dict[str, int]:
    return {"heads": config.num_heads, "kv_heads": config.num_kv_heads}


def _spec(logical, shape, mesh, config) -> tuple[PartitionSpec, list[str]]:
    """The rules' spec, with a heads axis split only at whole heads; and the axes left replicated."""
    spec = list(DEFAULT_RULES.spec(logical, shape, mesh))
    heads = _head_counts(config)
    replicated = []
    for i, name in enumerate(logical):
        axes = DEFAULT_RULES.mesh_axes(name)
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = math.prod(mesh.shape[n] for n in names)
        if ways <= 1:
            continue
        if spec[i] is not None and name in heads and heads[name] % ways:
            spec[i] = None
        if spec[i] is None:
            size = heads.get(name, shape[i])
            replicated.append(f"{name} ({size} over {'x'.join(f'{n}={mesh.shape[n]}' for n in names)})")
    return PartitionSpec(*spec), replicated


def param_placement(state, mesh, config) -> tuple[object, list[str]]:
    """PartitionSpecs for a model state (nnx.state(model)), and what the mesh leaves replicated."""
    axes_by_name = param_axes(config)
    notes: list[str] = []

    def spec(path, leaf):
        name = param_name(path)
        if name not in axes_by_name:
            raise ConfigError(f"parameter '{name}' has no logical axes in its model family's PARAM_AXES")
        axes = axes_by_name[name]
        if axes[0] == "layers" and len(axes) == len(leaf.shape) + 1:
            axes = axes[1:]  # per-layer storage: one layer, no stacked axis
        s, replicated = _spec(axes, leaf.shape, mesh, config)
        notes.extend(replicated)
        return s

    return jax.tree_util.tree_map_with_path(spec, state), notes


def cache_specs(config, rows: int, length: int, mesh) -> tuple[PartitionSpec, list[str]]:
    """The spec of one keys/values array: stacked [L, rows, S, KV, D] or per layer [rows, S, KV, D]."""
    layer = ("batch", "length", "kv_heads", None)
    shape = (rows, length, config.num_kv_heads, config.head_dim)
    if config.layer_loop != "per_layer":
        layer, shape = ("layers",) + layer, (config.num_layers,) + shape
    spec, notes = _spec(layer, shape, mesh, config)
    return spec, [n.replace("batch", "cache rows") for n in notes]


def cache_sharding(config, rows: int, length: int, mesh: Mesh) -> KVCache:
    """A KVCache of NamedShardings in the model's cache layout."""
    one = NamedSharding(mesh, cache_specs(config, rows, length, mesh)[0])
    if config.layer_loop == "per_layer":
        return KVCache((one,) * config.num_layers, (one,) * config.num_layers)
    return KVCache(one, one)


def zeros_cache(config, rows: int, length: int, mesh: Mesh) -> KVCache:
    """An empty cache allocated in its shards (no device ever holds the whole)."""
    return jax.jit(lambda: KVCache.zeros(config, rows, length),
                   out_shardings=cache_sharding(config, rows, length, mesh))()


def row_sharding(mesh: Mesh, shape) -> NamedSharding:
    """Rows (axis 0) over data when it divides them, the rest replicated."""
    return NamedSharding(mesh, DEFAULT_RULES.spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


def put_rows(value, mesh: Mesh) -> jax.Array:
    """A host array (every process holds all of it) as one global array sharded by rows."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, row_sharding(mesh, value.shape), lambda index: value[index])


def put_replicated(value, mesh: Mesh) -> jax.Array:
    """A value every process holds as one replicated global array (a PRNG key through its raw data)."""
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_replicated(jax.random.key_data(value), mesh),
                                        impl=jax.random.key_impl(value))
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, mesh_lib.replicated(mesh), lambda index: host[index])


def output_shardings(abstract_out, cache: KVCache, mesh: Mesh):
    """Shardings of a DecodeOutput: its cache as given, every other array by rows."""
    rest = dataclasses.replace(abstract_out, cache=None)
    rest = jax.tree.map(lambda x: row_sharding(mesh, x.shape), rest)
    return dataclasses.replace(rest, cache=cache)


def _placed(leaf, sharding) -> bool:
    return isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def _place(value, sharding):
    if jax.process_count() == 1:
        return jax.device_put(value, sharding)
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_model(model, mesh: Mesh) -> list[str]:
    """Move `model`'s weights (the adapter's too) onto the mesh, in place; returns the replication notes."""
    state = nnx.state(model)
    specs, notes = param_placement(state, mesh, model.config)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if not all(_placed(a, s) for a, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))):
        nnx.update(model, jax.tree.map(_place, state, shardings))
    return notes


def say_replicated(notes: list[str], mesh: Mesh) -> None:
    """One warning line naming what the mesh leaves replicated (once per command)."""
    unique = list(dict.fromkeys(notes))
    line = f"mesh {describe(mesh)}: replicated, not divisible: {', '.join(unique)}"
    if unique and line not in _said:
        _said.add(line)
        warnings.warn(line, CllmWarning, stacklevel=2)


# --- memory -------------------------------------------------------------------------------------


def _shard_bytes(shape, itemsize: int, spec: PartitionSpec, mesh) -> int:
    ways = 1
    for entry in spec:
        for name in ((entry,) if isinstance(entry, str) else tuple(entry or ())):
            ways *= mesh.shape[name]
    return math.prod(shape) * itemsize // ways


def per_device_bytes(model, rows: int, length: int, mesh) -> tuple[int, int]:
    """(weights, KV cache) bytes each device holds on `mesh` (a Mesh or anything with .shape)."""
    state = nnx.state(model)
    specs, _ = param_placement(state, mesh, model.config)
    specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    weights = sum(_shard_bytes(a.shape, a.dtype.itemsize, s, mesh) for a, s in zip(jax.tree.leaves(state), specs))
    config = model.config
    spec, _ = cache_specs(config, rows, length, mesh)
    one = (config.num_layers, rows, length, config.num_kv_heads, config.head_dim)
    cache = 2 * _shard_bytes(one, np.dtype(config.compute_dtype).itemsize, spec, mesh)
    return weights, cache


def free_bytes_per_device(mesh: Mesh) -> int | None:
    """The least memory any local device of the mesh can still take (None: unknown)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if local and local[0].platform != "cpu":
        free = []
        for device in local:
            stats = device.memory_stats() or {}
            if "bytes_limit" not in stats:
                return None
            free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
        return min(free)
    try:  # simulated CPU devices share the host's memory
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // max(1, len(local))
    except (ValueError, OSError):
        return None


def held_bytes(model, mesh: Mesh) -> int:
    """Bytes of `model` that the mesh's first local device holds now (counted in its memory in use)."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if not local:
        return 0
    return sum(s.data.nbytes for a in jax.tree.leaves(nnx.state(model)) if isinstance(a, jax.Array)
               for s in a.addressable_shards if s.device == local[0])


def check_fits(model, rows: int, length: int, mesh: Mesh, free: int | None = None, held: int | None = None) -> None:
    """Refuse in one line, before anything is allocated, weights plus cache that do not fit a device;
    name the mesh of the same devices that would fit. `held`: bytes of this model a device holds already
    (default: read from its arrays), which moving it to the mesh frees."""
    free = free_bytes_per_device(mesh) if free is None else free
    if free is None:
        return
    held = held_bytes(model, mesh) if held is None else held
    weights, cache = per_device_bytes(model, rows, length, mesh)
    available = free + held  # what this model's shards hold now is freed when they move
    if weights + cache <= available:
        return
    n = mesh.devices.size
    fits = None
    for tensor in (t for t in range(1, n + 1) if n % t == 0):
        other = types.SimpleNamespace(shape={"data": n // tensor, "fsdp": 1, "tensor": tensor})
        if sum(per_device_bytes(model, rows, length, other)) <= available:
            fits = f"data={n // tensor},tensor={tensor}"
            break
    fix = (f"use --mesh {fits}" if fits else
           f"no mesh of these {n} devices fits it: use more devices, fewer rows (--batch-size) or fewer new tokens")
    raise InputError(f"on mesh {describe(mesh)} each device needs {size(weights)} of weights and {size(cache)} "
                     f"of KV cache ({rows} rows x {length} positions) but has {size(available)} free: {fix}")


def size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"
