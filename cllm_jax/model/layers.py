"""Pure building blocks of a LLaMA-family decoder layer.

Everything here is a function of arrays, so the same code serves the decoding loops (KV cache,
one token or a block at a time) and training (whole sequences, custom masks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.config import ModelConfig

MASK_VALUE = -1e30  # finite, so a fully masked row (a padded query) gives a uniform row, never NaN


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32 whatever the compute dtype, cast back afterwards (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(jnp.float32) * x32.astype(x.dtype).astype(jnp.float32)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, with the linear or LLaMA 3 scaling applied (static numpy)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # LLaMA 3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [batch, time, head_dim/2] for explicit integer positions."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(config))
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face layout) on x of shape [batch, time, heads, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention without repeating K/V in memory.

    q: [B, T, H, D]; k, v: [B, S, KV, D]; mask: [B, T, S] (True = may attend). Softmax in fp32.
    """
    batch, time, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, time, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(dim)
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, time, heads, dim)


def swiglu_mlp(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down
