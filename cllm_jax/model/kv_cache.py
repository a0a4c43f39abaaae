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
    keys: jax.Array  # [layers, batch, length, kv_heads, head_dim]
    values: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        dtype = dtype or config.compute_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.keys.shape[2]


def write_layer(cache_layer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new [B, T, KV, D] into cache_layer [B, S, KV, D] at slots `positions` [B, T].

    Positions past the end are dropped: padding tokens of a bucketed prompt may point there.
    """
    batch_index = jnp.arange(new.shape[0])[:, None]
    return cache_layer.at[batch_index, positions].set(new.astype(cache_layer.dtype), mode="drop")


def causal_mask(query_positions: jax.Array, length: int) -> jax.Array:
    """[B, T, S]: a query at position p sees slots 0..p."""
    return jnp.arange(length)[None, None, :] <= query_positions[:, :, None]
