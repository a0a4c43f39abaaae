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
from cllm_jax.errors import ConfigError

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


ATTENTION_IMPLEMENTATIONS = ("xla", "dot_product", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, implementation: str = "xla",
              causal: bool = False) -> jax.Array:
    """Attention by the configured implementation; same shapes and semantics as `grouped_attention`.

    "dot_product" and "cudnn" call jax.nn.dot_product_attention (GQA native). "cudnn" asks for cuDNN's
    fused kernel always (it fails where cuDNN cannot run: CPU, fp32, head_dim not a multiple of 8);
    "dot_product" asks for it where it can run and the pass has several queries (training, prefill,
    Jacobi blocks), else takes JAX's XLA implementation. `causal` (a plain lower-triangular mask
    over the T tokens) is passed as is_causal instead of a mask array: cuDNN's fastest form.
    """
    if mask is None and not causal:
        raise ConfigError("attention needs a mask or causal=True")
    if implementation == "xla":
        if mask is None:
            time = q.shape[1]
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((time, time), bool)), (q.shape[0], time, time))
        return grouped_attention(q, k, v, mask)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}")
    impl = "cudnn" if implementation == "cudnn" or _cudnn_can_run(q) else "xla"
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if causal else mask[:, None, :, :], is_causal=causal, implementation=impl)


def _cudnn_can_run(q: jax.Array) -> bool:
    dim = q.shape[-1]
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and dim % 8 == 0
            and dim <= 128 and q.shape[1] > 1)


REMAT_POLICIES = ("none", "dots", "full")


def remat_policy_name(remat: bool | str | None) -> str:
    """`remat` as one of REMAT_POLICIES; True/False are the old boolean spelling (full/none)."""
    if remat is None or remat is False:
        return "none"
    if remat is True:
        return "full"
    if remat not in REMAT_POLICIES:
        raise ConfigError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)} (or true/false)")
    return remat


def rematerialize(fn, remat: bool | str | None):
    """`fn` under jax.checkpoint as the policy says.

    full: keep only the layer's inputs, recompute everything in the backward pass (least memory).
    dots: also keep the results of matmuls without batch dimensions (the projections and the MLP),
    recompute the cheap elementwise work and the attention: most of full's saving at a fraction of
    its recomputation, the usual choice on accelerators.
    """
    name = remat_policy_name(remat)
    if name == "none":
        return fn
    if name == "full":
        return jax.checkpoint(fn)
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

