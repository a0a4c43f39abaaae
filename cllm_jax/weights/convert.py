"""Hugging Face tensor names (torch layout, [out, in]) <-> our stacked [in, out] parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cllm_jax.config import ModelConfig
from cllm_jax.errors import CheckpointError
from cllm_jax.model.llama import Llama, LayerWeights, layer_arrays, layer_param_shapes

# our per-layer name -> (HF suffix under model.layers.{i}., transposed?)
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "o_proj": ("self_attn.o_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}


def _take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise CheckpointError(f"checkpoint has no tensor '{name}': is it a LLaMA-family model matching its config.json?")
    value = np.asarray(tensors[name])
    if value.shape != shape:
        raise CheckpointError(f"tensor '{name}' has shape {value.shape}, config.json implies {shape}")
    return value


def model_from_hf_tensors(config: ModelConfig, tensors: dict[str, np.ndarray], stacked: bool | None = None) -> Llama:
    """Build a Llama whose parameters are the given HF-named tensors (no random init is run).

    `stacked` picks the layer storage (default: per-layer arrays iff config.layer_loop is per_layer).
    """
    dtype = jnp.dtype(config.param_dtype)
    stacked = config.layer_loop != "per_layer" if stacked is None else stacked
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), stacked=stacked))
    model.embed = nnx.Param(jnp.asarray(_take(tensors, "model.embed_tokens.weight", (config.vocab_size, config.hidden_size)), dtype))
    model.final_norm = nnx.Param(jnp.asarray(_take(tensors, "model.norm.weight", (config.hidden_size,)), dtype))
    if not config.tie_word_embeddings:
        head = _take(tensors, "lm_head.weight", (config.vocab_size, config.hidden_size))
        model.lm_head = nnx.Param(jnp.asarray(head.T, dtype))
    per_layer = [{} for _ in range(config.num_layers)]
    for name, shape in layer_param_shapes(config).items():
        suffix, transposed = _LAYER_NAMES[name]
        hf_shape = shape[::-1] if transposed else shape
        for i in range(config.num_layers):
            value = _take(tensors, f"model.layers.{i}.{suffix}", hf_shape)
            per_layer[i][name] = value.T if transposed else value
        if stacked:
            setattr(model.layers, name, nnx.Param(jnp.asarray(np.stack([p[name] for p in per_layer]), dtype)))
            for p in per_layer:
                del p[name]
    if not stacked:
        model.layers = nnx.List([LayerWeights({k: jnp.asarray(v, dtype) for k, v in p.items()}) for p in per_layer])
    return model


def hf_tensors_from_model(model: Llama) -> dict[str, np.ndarray]:
    """The inverse of `model_from_hf_tensors`: HF names, torch layout, float32 numpy."""
    as_np = lambda x: np.asarray(jax.device_get(x), dtype=np.float32)  # noqa: E731
    tensors = {
        "model.embed_tokens.weight": as_np(model.embed[...]),
        "model.norm.weight": as_np(model.final_norm[...]),
    }
    if model.lm_head is not None:
        tensors["lm_head.weight"] = np.ascontiguousarray(as_np(model.lm_head[...]).T)
    for i, params in enumerate(layer_arrays(model)):  # stacked or per-layer storage alike
        for name, value in params.items():
            suffix, transposed = _LAYER_NAMES[name]
            value = as_np(value)
            tensors[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(value.T if transposed else value)
    return tensors
