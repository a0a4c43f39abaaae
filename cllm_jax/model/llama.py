"""The LLaMA family (LLaMA 1-3, SmolLM, Mistral without sliding window, Qwen2) as one Flax NNX module.

Layer parameters are stacked along a leading `layers` axis and the decoder runs as one `lax.scan`:
XLA compiles a single layer body instead of 30 copies, which keeps CPU compile times to seconds.
Linear weights are stored [in, out] so a projection is `x @ w`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cllm_jax.config import ModelConfig
from cllm_jax.model import layers as L
from cllm_jax.model.kv_cache import KVCache, causal_mask


def layer_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer parameter shapes (without the stacked `layers` axis)."""
    d, f = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "attn_norm": (d,),
        "q_proj": (d, q_dim),
        "k_proj": (d, kv_dim),
        "v_proj": (d, kv_dim),
        "o_proj": (q_dim, d),
        "mlp_norm": (d,),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }
    if config.attention_bias:
        shapes.update(q_bias=(q_dim,), k_bias=(kv_dim,), v_bias=(kv_dim,))
    return shapes


class DecoderStack(nnx.Module):
    """All decoder layers' weights, each an nnx.Param of shape [num_layers, ...]."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.names = tuple(layer_param_shapes(config))
        for name, shape in layer_param_shapes(config).items():
            full = (config.num_layers, *shape)
            if name.endswith("norm"):
                value = jnp.ones(full, dtype)
            elif name.endswith("bias"):
                value = jnp.zeros(full, dtype)
            else:
                value = init(rngs.params(), full, dtype)
            setattr(self, name, nnx.Param(value))

    def stacked(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.config = config
        self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        self.layers = DecoderStack(config, rngs)
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), dtype))
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        mask: jax.Array | None = None,
        remat: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] and the updated cache.

        With a cache, token t of row b is written to slot positions[b, t] and attends to slots
        <= positions[b, t]. Without one, the T tokens attend to each other under `mask` [B, T, T]
        (default: causal), which is what training and packed layouts use.
        """
        config = self.config
        dtype = config.compute_dtype
        batch, time = tokens.shape
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        cos, sin = L.rope_tables(config, positions)
        if cache is not None:
            mask = causal_mask(positions, cache.length) if mask is None else mask
        elif mask is None:
            mask = jnp.broadcast_to(jnp.tril(jnp.ones((time, time), bool)), (batch, time, time))
        batch_index = jnp.arange(batch)[:, None]

        def project(h, params, name, heads):
            out = h @ params[f"{name}_proj"].astype(dtype)
            if config.attention_bias:
                out = out + params[f"{name}_bias"].astype(dtype)
            return out.reshape(batch, time, heads, config.head_dim)

        def layer(carry, xs):
            x, keys, values = carry
            params, index = xs
            h = L.rms_norm(x, params["attn_norm"], config.rms_norm_eps).astype(dtype)
            q = L.apply_rope(project(h, params, "q", config.num_heads), cos, sin)
            k = L.apply_rope(project(h, params, "k", config.num_kv_heads), cos, sin)
            v = project(h, params, "v", config.num_kv_heads)
            if keys is not None:
                # Scatter straight into the stacked buffer: it is a loop carry, so XLA updates in place.
                keys = keys.at[index, batch_index, positions].set(k.astype(keys.dtype), mode="drop")
                values = values.at[index, batch_index, positions].set(v.astype(values.dtype), mode="drop")
                k, v = keys[index].astype(dtype), values[index].astype(dtype)
            attn = L.grouped_attention(q, k, v, mask).reshape(batch, time, -1)
            x = x + attn @ params["o_proj"].astype(dtype)
            h = L.rms_norm(x, params["mlp_norm"], config.rms_norm_eps).astype(dtype)
            x = x + L.swiglu_mlp(
                h, params["gate_proj"].astype(dtype), params["up_proj"].astype(dtype), params["down_proj"].astype(dtype)
            )
            return (x, keys, values), None

        if remat:
            layer = jax.checkpoint(layer)
        keys, values = (cache.keys, cache.values) if cache is not None else (None, None)
        xs = (self.layers.stacked(), jnp.arange(config.num_layers))
        (x, keys, values), _ = jax.lax.scan(layer, (x, keys, values), xs)
        hidden = L.rms_norm(x, self.final_norm[...], config.rms_norm_eps).astype(dtype)
        return hidden, (KVCache(keys, values) if cache is not None else None)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits in fp32 for hidden states of any leading shape."""
        if self.lm_head is None:
            # Contract against the [V, D] embedding directly: a transposed copy would cost a full
            # pass over the largest matrix in every decoding step.
            embed = self.embed[...].astype(hidden.dtype)
            return jnp.einsum("...d,vd->...v", hidden, embed, preferred_element_type=jnp.float32)
        return jnp.matmul(hidden, self.lm_head[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
