"""A fixed-size KV cache whose slot index is the token's absolute position.

Slot == position makes every decoding strategy one rule: a token at position p writes slot p and
attends to slots <= p. Rows of a batch advance independently (different prompt lengths, rows that
accept different numbers of Jacobi tokens) with no bookkeeping beyond their positions. Slots past a
row's frontier may hold stale values from rejected guesses or prompt padding; the causal rule never
reads them before the same pass has overwritten them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from cllm_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values in one of two layouts, matching the model's layer loop.

    stacked (layer_loop "scan"): one array [layers, batch, length, kv_heads, head_dim] each, the
    carry of the scan; per layer ("per_layer"): a tuple of [batch, length, kv_heads, head_dim] arrays,
    one buffer per layer, so each layer's scatter and read touch only its own buffer.
    """

    keys: jax.Array | tuple[jax.Array, ...]
    values: jax.Array | tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        dtype = dtype or config.compute_dtype
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        if config.layer_loop == "per_layer":
            keys = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            values = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
            return cls(keys, values)
        shape = (config.num_layers, *shape)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.keys, (tuple, list))

    @property
    def length(self) -> int:
        return self.keys[0].shape[1] if self.per_layer else self.keys.shape[2]

    def map_layers(self, fn) -> "KVCache":
        """A cache of the same layout whose every layer's keys and values are fn(array), fn taking and
        returning one layer's [batch, length, kv_heads, head_dim] (e.g. to repeat or select rows)."""
        if self.per_layer:
            return KVCache(tuple(fn(k) for k in self.keys), tuple(fn(v) for v in self.values))
        return KVCache(jax.vmap(fn)(self.keys), jax.vmap(fn)(self.values))


def causal_mask(query_positions: jax.Array, length: int) -> jax.Array:
    """[B, T, S]: a query at position p sees slots 0..p."""
    return jnp.arange(length)[None, None, :] <= query_positions[:, :, None]
