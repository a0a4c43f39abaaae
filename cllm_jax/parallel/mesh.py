"""The device mesh (data, fsdp, tensor) and the logical-axis rules that place arrays on it.

Every parameter and activation axis has a logical name ("embed", "heads", "batch", ...); a small
rules table maps each name to mesh axes. Parameters are found by their name in the model state
(the stacked decoder weights carry a leading "layers" axis, replicated; the per-layer storage of
the per_layer loop has the same rules without it). A dimension that the mapped mesh axes
do not divide evenly stays replicated, so any mesh works for any model, only less sharded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from cllm_jax.errors import ConfigError
from cllm_jax.model.interface import param_axes

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis name -> mesh axis (or tuple of mesh axes, or None for replicated)."""

    rules: tuple[tuple[str, MeshAxes], ...] = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("layers", None),
        ("length", None),
        ("act_embed", None),
        ("act_vocab", "tensor"),
    )

    def mesh_axes(self, logical: str | None) -> MeshAxes:
        if logical is None:
            return None
        for name, axes in self.rules:
            if name == logical:
                return axes
        raise ConfigError(f"no sharding rule for logical axis '{logical}'")

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> PartitionSpec:
        """The PartitionSpec of an array; with shape and mesh, non-dividing axes are replicated."""
        out, used = [], set()
        for i, logical in enumerate(logical_axes):
            axes = self.mesh_axes(logical)
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            names = tuple(n for n in names if n not in used)  # a mesh axis shards one dim at most
            if shape is not None and mesh is not None:
                names = tuple(n for n in names if mesh.shape[n] > 1)
                if names and shape[i] % math.prod(mesh.shape[n] for n in names):
                    names = ()
            used.update(names)
            out.append(None if not names else names[0] if len(names) == 1 else names)
        return PartitionSpec(*out)


DEFAULT_RULES = AxisRules()

def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 filled in; their product must be the device count."""
    sizes = [data, fsdp, tensor]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f"mesh sizes must be >= 1, one of them may be -1 (fill in): "
                          f"data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ConfigError(f"the fixed mesh axes ({known} devices) do not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh data x fsdp x tensor = {sizes[0]}x{sizes[1]}x{sizes[2]} = {math.prod(sizes)} "
                          f"but there are {num_devices} devices: make the product match (-1 fills in)")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types.

    Auto axes let jit propagate shardings from the explicit in/out shardings of the train step
    (jax.make_mesh defaults to Explicit axes, which would type every intermediate).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def single_device_mesh(device=None) -> Mesh:
    return make_mesh(1, 1, 1, devices=[device or jax.devices()[0]])


def param_name(path) -> str:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if not names:
        raise ConfigError(f"cannot name parameter at {jax.tree_util.keystr(path)}")
    return str(names[-1])


def _layer_index(path) -> int | None:
    """The layer number in a per-layer parameter's path (layers/3/q_proj), None when stacked."""
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    for before, key in zip(keys, keys[1:]):
        if before == "layers" and isinstance(key, int):
            return key
    return None


def param_specs(params, mesh: Mesh, rules: AxisRules = DEFAULT_RULES, axes_by_name: dict | None = None):
    """A PartitionSpec for every parameter array of `params` (a model State), same structure;
    `axes_by_name`: the model family's logical axes per parameter name (default: the LLaMA family's)."""
    axes_by_name = param_axes() if axes_by_name is None else axes_by_name

    def spec(path, leaf):
        name = param_name(path)
        if name not in axes_by_name:
            raise ConfigError(f"parameter '{name}' has no logical axes in its model family's PARAM_AXES")
        axes = axes_by_name[name]
        if axes[0] == "layers" and _layer_index(path) is not None:
            axes = axes[1:]  # per-layer storage (model.layers[i].name): one layer, no stacked axis
        if len(axes) != len(leaf.shape):
            raise ConfigError(f"parameter '{name}' has shape {leaf.shape}, its axes are {axes}")
        return rules.spec(axes, leaf.shape, mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params, mesh: Mesh, rules: AxisRules = DEFAULT_RULES):
    """A NamedSharding for every parameter array of `params`, same structure."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                     rules: AxisRules = DEFAULT_RULES) -> NamedSharding:
    return NamedSharding(mesh, rules.spec(logical_axes, shape, mesh if shape is not None else None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, ndim: int, rules: AxisRules = DEFAULT_RULES) -> NamedSharding:
    """Training batches are [grad_accum, batch, ...]: the batch axis is split over (data, fsdp)."""
    return NamedSharding(mesh, rules.spec((None, "batch") + (None,) * (ndim - 2)))


def batch_divisor(mesh: Mesh, rules: AxisRules = DEFAULT_RULES) -> int:
    """How many ways the batch axis is split: the batch size must be a multiple of it."""
    axes = rules.mesh_axes("batch")
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[n] for n in names)


def constrain(x: jax.Array, mesh: Mesh | None, logical_axes: Sequence[str | None],
              rules: AxisRules = DEFAULT_RULES) -> jax.Array:
    """with_sharding_constraint by logical axes (a no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, logical_axes, x.shape, rules))
