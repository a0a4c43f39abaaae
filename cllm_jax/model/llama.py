"""The LLaMA family (LLaMA 1-3, SmolLM, Mistral without sliding window, Qwen2) as one Flax NNX module.

One decoder layer (`decoder_layer`), run by one of two loops (`ModelConfig.layer_loop`):
- "scan": `lax.scan` over weights stacked along a leading `layers` axis. XLA compiles one layer
  body instead of 30 copies: seconds of compile time on a CPU, and the fastest for small models on a
  GPU (few kernel launches). But each step slices its layer's weights and cache out of the stacked
  buffers, which at 7B on a GPU, and at any size in a CPU's decoding step, costs about as much as the
  matmuls themselves (both are reads of every weight).
- "per_layer": a Python loop, so XLA sees each layer as straight-line code. With per-layer weight and
  cache arrays (`unstack_layers`, the decoding layout) nothing is sliced: the fastest at 7B on a GPU.

The stacked layout is canonical: training states, checkpoints and sharding rules use it, whatever
the loop (with stacked weights the per-layer loop takes static slices inside the jitted function),
so a checkpoint restores under either loop. Linear weights are stored [in, out]: `x @ w`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cllm_jax.config import ModelConfig
from cllm_jax.errors import ConfigError, InputError
from cllm_jax.model import layers as L
from cllm_jax.model.adapter import Adapter, LayerAdapter
from cllm_jax.model.kv_cache import KVCache, causal_mask

LAYER_LOOPS = ("scan", "per_layer")
# "auto" picks per_layer on an accelerator from this many parameters: small models are bound by kernel
# launches, which the scan keeps few; large ones by slicing each layer out of the stacked weights,
# which the per-layer loop avoids (the crossing, measured on an H200, is in reports/README.md).
PER_LAYER_MIN_PARAMS = 1_000_000_000


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


# Logical axes of every parameter, by the name it has in the model state.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": (None,),
    "attn_norm": ("layers", None),
    "mlp_norm": ("layers", None),
    "q_proj": ("layers", "embed", "heads"),
    "k_proj": ("layers", "embed", "kv_heads"),
    "v_proj": ("layers", "embed", "kv_heads"),
    "o_proj": ("layers", "heads", "embed"),
    "q_bias": ("layers", "heads"),
    "k_bias": ("layers", "kv_heads"),
    "v_bias": ("layers", "kv_heads"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
}
# An adapter's A [layers, in, r] and B [layers, r, out] split like their projection's in and out axes;
# the rank axis is small and replicated.
PARAM_AXES.update({
    f"{name}_lora_{part}": (axes[0], axes[1], None) if part == "a" else (axes[0], None, axes[2])
    for name, axes in list(PARAM_AXES.items()) if name.endswith("_proj") for part in "ab"
})
PARAM_AXES["placeholders"] = (None, "embed")  # a placeholder drafter's k embeddings, split like the token embedding


def param_count(config: ModelConfig) -> int:
    layer = sum(math.prod(s) for s in layer_param_shapes(config).values())
    head = 0 if config.tie_word_embeddings else config.hidden_size * config.vocab_size
    return config.vocab_size * config.hidden_size + head + config.num_layers * layer + config.hidden_size


def resolve_layer_loop(choice: str, config: ModelConfig, backend: str | None = None, *,
                       training: bool = False) -> str:
    """"scan" or "per_layer" for a choice of auto|scan|per_layer. auto on a CPU: per_layer to decode,
    scan to train. A CPU decoding step is bound by reading the weights, and the scan reads each layer
    twice (the slice out of the stacked buffer, then the matmuls): per_layer ran SmolLM2's AR steps
    1.33x faster and Qwen2.5-0.5B's 2.29x, for about 8 s of compilation against 2
    (benchmarks/speed/layer_loop.py). A training step
    is bound by its arithmetic, where the slice is cheap and one compiled layer keeps compile time
    short. On an accelerator: per_layer from PER_LAYER_MIN_PARAMS parameters."""
    if choice in LAYER_LOOPS:
        return choice
    if choice != "auto":
        raise ConfigError(f"layer loop {choice!r} is not one of auto, {', '.join(LAYER_LOOPS)}")
    if (backend or jax.default_backend()) == "cpu":
        return "scan" if training else "per_layer"
    return "per_layer" if param_count(config) >= PER_LAYER_MIN_PARAMS else "scan"


def _init_value(name: str, shape, dtype, rngs: nnx.Rngs) -> jax.Array:
    if name.endswith("norm"):
        return jnp.ones(shape, dtype)
    if name.endswith("bias"):
        return jnp.zeros(shape, dtype)
    return nnx.initializers.normal(0.02)(rngs.params(), shape, dtype)


class DecoderStack(nnx.Module):
    """All decoder layers' weights, each an nnx.Param of shape [num_layers, ...] (canonical layout)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.param_dtype)
        self.names = tuple(layer_param_shapes(config))
        for name, shape in layer_param_shapes(config).items():
            setattr(self, name, nnx.Param(_init_value(name, (config.num_layers, *shape), dtype, rngs)))

    def stacked(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    def layer(self, index: int) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...][index] for name in self.names}

    def __len__(self) -> int:
        return getattr(self, self.names[0]).shape[0]


class LayerWeights(nnx.Module):
    """One decoder layer's weights as separate arrays (the per-layer layout's element)."""

    def __init__(self, values: dict[str, jax.Array]):
        self.names = tuple(values)
        for name, value in values.items():
            setattr(self, name, nnx.Param(value))

    def params(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def is_stacked(model: "Llama") -> bool:
    return isinstance(model.layers, DecoderStack)


def layer_arrays(model: "Llama") -> list[dict[str, jax.Array]]:
    """Every layer's weights as a dict of arrays, whatever the storage (slices when stacked)."""
    if is_stacked(model):
        return [model.layers.layer(i) for i in range(model.config.num_layers)]
    return [layer.params() for layer in model.layers]


def unstack_layers(model: "Llama") -> "Llama":
    """Switch `model` (in place) to per-layer weight arrays and the per_layer loop; returns it.

    Each stacked parameter is released once sliced, so the peak is one stacked parameter above the
    model, not the model twice.
    """
    if is_stacked(model):
        stack = model.layers
        per_layer = [{} for _ in range(model.config.num_layers)]
        for name in stack.names:
            value = getattr(stack, name)[...]
            for i in range(len(per_layer)):
                per_layer[i][name] = value[i]
            delattr(stack, name)
            del value
        model.layers = nnx.List([LayerWeights(values) for values in per_layer])
    model.config = model.config.replace(layer_loop="per_layer")
    return model


def stack_layers(model: "Llama", layer_loop: str = "scan") -> "Llama":
    """Switch `model` (in place) to the canonical stacked weights, running `layer_loop`; returns it."""
    if not is_stacked(model):
        arrays = layer_arrays(model)
        stack = nnx.eval_shape(lambda: DecoderStack(model.config, nnx.Rngs(0)))
        for name in stack.names:
            setattr(stack, name, nnx.Param(jnp.stack([a[name] for a in arrays])))
        model.layers = stack
    model.config = model.config.replace(layer_loop=layer_loop)
    return model


def cast_matrices(model: "Llama", dtype) -> "Llama":
    """Store every weight matrix (embedding, projections, head) in `dtype`, in place; returns the model.

    For decoding in a half dtype: the forward casts each matrix to the compute dtype before use, so
    stored in it the outputs are bit-identical and a decoding step (memory-bound) reads half the
    bytes. Norms and biases keep their dtype (the norms are applied in fp32). Not for training:
    its parameters and optimizer state stay fp32.
    """
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 else x, state))
    return model


def merge_adapter(model: "Llama") -> "Llama":
    """Fold the adapter into the base weights (W += A @ B * scale) and drop it, in place; returns it.

    The merged model is the lossy CLLM: it computes what the adapter computes on every token. A merge
    whose model no longer computes finite logits (an adapter holding NaN, inf, or values that
    overflow once added) is refused and the model left as it was: a merged model has no base weights
    to fall back on, and would decode garbage without a word. A placeholder drafter has nothing to
    merge: it acts only on its placeholder tokens, which plain decoding never feeds.
    """
    adapter = model.adapter
    if adapter is None:
        return model
    if adapter.placeholders is not None:
        raise InputError("a placeholder drafter cannot be merged into the weights: it acts only on its "
                         "placeholder tokens; decode with --method lossless-placeholder instead")
    scale = adapter.config.scale
    params = ([(getattr(model.layers, t), None) for t in adapter.config.targets] if is_stacked(model) else
              [(getattr(layer, t), i) for t in adapter.config.targets for i, layer in enumerate(model.layers)])
    originals = [param[...] for param, _ in params]
    deltas = {t: jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
              for t, (a, b) in adapter.stacked().items()}
    targets = [t for t in adapter.config.targets for _ in ([None] if is_stacked(model) else model.layers)]
    for (param, layer), target in zip(params, targets):
        delta = deltas[target] if layer is None else deltas[target][layer]
        param[...] = (param[...].astype(jnp.float32) + delta).astype(param[...].dtype)
    model.adapter = None
    probe = jnp.arange(8, dtype=jnp.int32)[None] % model.config.vocab_size
    hidden, _ = model(probe, jnp.arange(8, dtype=jnp.int32)[None])
    if not bool(jnp.all(jnp.isfinite(model.logits(hidden)))):
        for (param, _), value in zip(params, originals):
            param[...] = value
        model.adapter = adapter
        raise InputError("merging the adapter gives a model whose logits are not finite (the adapter holds NaN, "
                         "inf or values too large): decode losslessly instead of --merge-adapter")
    return model


def decoder_layer(config: ModelConfig, params: dict, x: jax.Array, cos: jax.Array, sin: jax.Array, *,
                  mask: jax.Array | None, positions: jax.Array, kv=None, adapter: LayerAdapter | None = None,
                  slots: jax.Array | None = None):
    """One pre-norm LLaMA decoder layer: (x, updated kv).

    kv is None (no cache: the T tokens attend to each other under `mask`; None mask = causal) or
    (keys, values, index): the layer's own [B, S, KV, D] buffers (index None) or the stacked
    [L, B, S, KV, D] buffers and this layer's index. The new keys/values are scattered to `slots`
    (default: the positions; past the end: dropped) before the queries attend, so a block sees
    itself. `adapter`: this layer's low-rank adapter, added to the projections it targets.
    """
    dtype = config.compute_dtype
    batch, time = x.shape[:2]
    slots = positions if slots is None else slots

    def linear(h, name):
        out = h @ params[name].astype(dtype)
        delta = adapter.delta(h, name) if adapter is not None else None
        return out if delta is None else out + delta

    def project(h, name, heads):
        out = linear(h, f"{name}_proj")
        if config.attention_bias:
            out = out + params[f"{name}_bias"].astype(dtype)
        return out.reshape(batch, time, heads, config.head_dim)

    h = L.rms_norm(x, params["attn_norm"], config.rms_norm_eps).astype(dtype)
    q = L.apply_rope(project(h, "q", config.num_heads), cos, sin)
    k = L.apply_rope(project(h, "k", config.num_kv_heads), cos, sin)
    v = project(h, "v", config.num_kv_heads)
    if adapter is not None and adapter.on is not None:
        # A base token gives a drafter key a weight of exactly 0, but 0 * NaN is NaN: the adapted tokens'
        # keys and values are kept finite, so no adapter can reach the base tokens through attention.
        drafted = adapter.on[:, :, None, None]
        k = jnp.where(drafted, jnp.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0), k)
        v = jnp.where(drafted, jnp.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0), v)
    if kv is not None:
        keys, values, index = kv
        rows = jnp.arange(batch)[:, None]
        if index is None:
            keys = keys.at[rows, slots].set(k.astype(keys.dtype), mode="drop")
            values = values.at[rows, slots].set(v.astype(values.dtype), mode="drop")
            k, v = keys.astype(dtype), values.astype(dtype)
        else:
            # Scatter straight into the stacked buffer: a loop carry, so XLA updates it in place.
            keys = keys.at[index, rows, slots].set(k.astype(keys.dtype), mode="drop")
            values = values.at[index, rows, slots].set(v.astype(values.dtype), mode="drop")
            k, v = keys[index].astype(dtype), values[index].astype(dtype)
        kv = (keys, values)
    attn = L.attention(q, k, v, mask, config.attention, causal=mask is None).reshape(batch, time, -1)
    x = x + linear(attn, "o_proj")
    h = L.rms_norm(x, params["mlp_norm"], config.rms_norm_eps).astype(dtype)
    x = x + linear(jax.nn.silu(linear(h, "gate_proj")) * linear(h, "up_proj"), "down_proj")
    return x, kv


class Llama(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stacked: bool | None = None):
        """Random weights. `stacked` (default: unless config.layer_loop is per_layer) picks the
        storage; the per_layer loop runs on either."""
        if config.layer_loop not in LAYER_LOOPS:
            raise ConfigError(f"config.layer_loop {config.layer_loop!r} is not one of {', '.join(LAYER_LOOPS)}")
        dtype = jnp.dtype(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        self.config = config
        self.embed = nnx.Param(init(rngs.params(), (config.vocab_size, config.hidden_size), dtype))
        if stacked is None:
            stacked = config.layer_loop != "per_layer"
        if stacked:
            self.layers = DecoderStack(config, rngs)
        else:
            shapes = layer_param_shapes(config)
            self.layers = nnx.List([
                LayerWeights({name: _init_value(name, shape, dtype, rngs) for name, shape in shapes.items()})
                for _ in range(config.num_layers)
            ])
        self.final_norm = nnx.Param(jnp.ones((config.hidden_size,), dtype))
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nnx.Param(init(rngs.params(), (config.hidden_size, config.vocab_size), dtype))
        )
        self.adapter: Adapter | None = None  # cllm_jax.model.adapter.attach gives it one

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        mask: jax.Array | None = None,
        remat: bool | str = False,
        *,
        adapter_gate: jax.Array | None = None,
        slots: jax.Array | None = None,
        adapter_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] and the updated cache.

        With a cache, token t of row b is written to slot `slots[b, t]` (default positions[b, t])
        and, without a `mask` [B, T, S], attends to slots <= positions[b, t]. Without a cache the
        T tokens attend to each other under `mask` [B, T, T] (default: causal), which is what
        training and packed layouts use. `remat`: none | dots | full (or False/True), the
        rematerialization policy of each layer in a backward pass. With an adapter attached,
        `adapter_gate` [B, T] scales its contribution per token (None: 1 everywhere) and
        `adapter_rng` turns on its dropout (training).
        """
        config = self.config
        adapter = self.adapter
        # Ids past the vocabulary are clipped (a drafted id is only ever a guess) or, with a placeholder
        # drafter, its placeholders.
        x = jnp.take(self.embed[...], jnp.clip(tokens, 0, config.vocab_size - 1), axis=0)
        if adapter is not None:
            x = adapter.embed(tokens, x, config.vocab_size)
        x = x.astype(config.compute_dtype)
        cos, sin = L.rope_tables(config, positions)
        if cache is not None and mask is None:
            mask = causal_mask(positions, cache.length)
        lora = adapter.stacked() if adapter is not None else None

        def layer(x, params, kv, lora_layer, index):
            layer_adapter = None
            if lora_layer is not None:
                key = None if adapter_rng is None else jax.random.fold_in(adapter_rng, index)
                layer_adapter = LayerAdapter(lora_layer, adapter.config.scale, adapter_gate,
                                             adapter.config.dropout, key)
            return decoder_layer(config, params, x, cos, sin, mask=mask, positions=positions, kv=kv,
                                 adapter=layer_adapter, slots=slots)

        layer = L.rematerialize(layer, remat)
        if config.layer_loop == "scan":
            x, cache = self._scan(layer, x, cache, lora)
        else:
            x, cache = self._loop(layer, x, cache, lora)
        hidden = L.rms_norm(x, self.final_norm[...], config.rms_norm_eps).astype(config.compute_dtype)
        return hidden, cache

    def _scan(self, layer, x, cache, lora):
        if not is_stacked(self) or (cache is not None and cache.per_layer):
            raise ConfigError("the scan layer loop needs stacked weights and a stacked KV cache: build the "
                              "cache with KVCache.zeros(model.config, ...) and the model with stack_layers")

        def body(carry, xs):
            x, keys, values = carry
            params, lora_layer, index = xs
            x, kv = layer(x, params, None if keys is None else (keys, values, index), lora_layer, index)
            return (x, *(kv or (None, None))), None

        keys, values = (cache.keys, cache.values) if cache is not None else (None, None)
        xs = (self.layers.stacked(), lora, jnp.arange(self.config.num_layers))
        (x, keys, values), _ = jax.lax.scan(body, (x, keys, values), xs)
        return x, (KVCache(keys, values) if cache is not None else None)

    def _loop(self, layer, x, cache, lora):
        def lora_at(i):  # the adapter stays stacked (it is small): a static slice per layer
            return None if lora is None else {t: (a[i], b[i]) for t, (a, b) in lora.items()}

        if cache is None:
            for i, params in enumerate(layer_arrays(self)):
                x, _ = layer(x, params, None, lora_at(i), i)
            return x, None
        if not cache.per_layer:  # a stacked cache: scatter into it at a static layer index
            keys, values = cache.keys, cache.values
            for i, params in enumerate(layer_arrays(self)):
                x, (keys, values) = layer(x, params, (keys, values, i), lora_at(i), i)
            return x, KVCache(keys, values)
        keys, values = list(cache.keys), list(cache.values)
        for i, params in enumerate(layer_arrays(self)):
            x, (keys[i], values[i]) = layer(x, params, (keys[i], values[i], None), lora_at(i), i)
        return x, KVCache(tuple(keys), tuple(values))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Vocabulary logits in fp32 for hidden states of any leading shape."""
        if self.lm_head is None:
            # Contract against the [V, D] embedding directly: a transposed copy would cost a full
            # pass over the largest matrix in every decoding step.
            embed = self.embed[...].astype(hidden.dtype)
            return jnp.einsum("...d,vd->...v", hidden, embed, preferred_element_type=jnp.float32)
        return jnp.matmul(hidden, self.lm_head[...].astype(hidden.dtype), preferred_element_type=jnp.float32)
