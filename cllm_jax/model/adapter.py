"""Low-rank adapters (LoRA) on the decoder's projections, switched on per token by a gate.

An adapted projection computes x @ W + (x @ A) @ B * alpha / rank where the token's gate is on and
x @ W where it is off, with W the frozen base weight, A [in, r] and B [r, out] the adapter. B starts
at zero (and A as peft draws it), so a fresh adapter leaves the model's function unchanged. The gate
is per token: with it one forward pass can run some tokens as the base model and others as the
adapted model while reading the base weights once, which is what lossless drafting needs (the base
verifies, the adapter drafts). Without a gate the adapter acts on every token.

The gate selects; it never multiplies. 0 * NaN is NaN, so a product would carry a broken adapter's
numbers (NaN, inf, or values that overflow) into the base model's tokens; a select leaves them
bit-identical to the base model's whatever the adapter holds (and the decoder layer keeps the
drafter's keys and values finite for the same reason: a masked attention weight is 0, and 0 * NaN
is NaN).

A placeholder drafter (`AdapterConfig.placeholders` = k > 0) also learns k embeddings: token ids
vocab_size .. vocab_size + k - 1 stand for them, so a drafting layout appends placeholders to the
text as ordinary token ids, and the adapter runs only on them.

Adapter weights are `LoRAParam`s, a subclass of nnx.Param, so `nnx.split(model, LoRAParam, ...)`
separates them from the base: training differentiates, optimizes and checkpoints only them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from cllm_jax.config import ModelConfig
from cllm_jax.errors import ConfigError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRAParam(nnx.Param):
    """An adapter weight (the base model's weights stay plain nnx.Params)."""


def target_name(name: str) -> str:
    """'q' or 'q_proj' -> 'q_proj' (both spellings are accepted in configs)."""
    full = name if name.endswith("_proj") else f"{name}_proj"
    if full not in TARGETS:
        short = ", ".join(t.removesuffix("_proj") for t in TARGETS)
        raise ConfigError(f"adapter target {name!r} is not a projection of the decoder (choose from {short})")
    return full


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = TARGETS
    dropout: float = 0.0  # on the adapter's input, in training only
    placeholders: int = 0  # k learned placeholder embeddings (the placeholder drafter); 0: none

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"adapter rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"adapter alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter dropout must lie in [0, 1), got {self.dropout!r}")
        if isinstance(self.placeholders, bool) or not isinstance(self.placeholders, int) or self.placeholders < 0:
            raise ConfigError(f"adapter placeholders must be an integer >= 0, got {self.placeholders!r}")
        targets = tuple(dict.fromkeys(target_name(t) for t in self.targets))
        if not targets:
            raise ConfigError("adapter targets is empty: name at least one projection (e.g. [q, v])")
        object.__setattr__(self, "targets", targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def projection_shape(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) of a decoder projection."""
    d, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}[target]  # fmt: skip


class Adapter(nnx.Module):
    """Every layer's A and B for each target, stacked along a leading `layers` axis."""

    def __init__(self, model_config: ModelConfig, config: AdapterConfig, rngs: nnx.Rngs):
        self.config = config
        dtype = jnp.dtype(model_config.param_dtype)
        layers, r = model_config.num_layers, config.rank
        for target in config.targets:
            fan_in, fan_out = projection_shape(model_config, target)
            # peft's draw for A (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(rngs.params(), (layers, fan_in, r), dtype, -bound, bound)
            setattr(self, f"{target}_lora_a", LoRAParam(a))
            setattr(self, f"{target}_lora_b", LoRAParam(jnp.zeros((layers, r, fan_out), dtype)))
        # Placeholders start as the mean of the token embeddings would be a guess of the unknown token;
        # a small random draw (the embedding's own init scale) keeps the k of them distinguishable.
        self.placeholders = (LoRAParam(0.02 * jax.random.normal(rngs.params(), (config.placeholders,
                                                                                  model_config.hidden_size), dtype))
                             if config.placeholders else None)

    def stacked(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        return {t: (getattr(self, f"{t}_lora_a")[...], getattr(self, f"{t}_lora_b")[...]) for t in self.config.targets}

    def num_params(self) -> int:
        extra = 0 if self.placeholders is None else self.placeholders.size
        return extra + sum(a.size + b.size for a, b in self.stacked().values())

    def embed(self, tokens: jax.Array, base_embedding: jax.Array, vocab_size: int) -> jax.Array:
        """base_embedding [B, T, D] with placeholder ids (>= vocab_size) replaced by their embeddings."""
        if self.placeholders is None:
            return base_embedding
        table = self.placeholders[...]
        index = jnp.clip(tokens - vocab_size, 0, table.shape[0] - 1)
        return jnp.where((tokens >= vocab_size)[..., None], table[index].astype(base_embedding.dtype),
                         base_embedding)


@dataclasses.dataclass(frozen=True)
class LayerAdapter:
    """What one decoder layer needs to apply the adapter: its A/B, the scale, the gate, dropout."""

    weights: dict  # target -> (A [in, r], B [r, out]) of this layer
    scale: float
    gate: jax.Array | None  # [B, T], nonzero where the adapter acts, or None (every token)
    dropout: float = 0.0
    key: jax.Array | None = None  # dropout key of this layer (training only)

    def delta(self, h: jax.Array, target: str) -> jax.Array | None:
        if target not in self.weights:
            return None
        a, b = self.weights[target]
        if self.key is not None and self.dropout > 0:
            key = jax.random.fold_in(self.key, TARGETS.index(target))
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(h.dtype)
        delta = ((h @ a.astype(h.dtype)) @ b.astype(h.dtype)) * jnp.asarray(self.scale, h.dtype)
        if self.gate is None:
            return delta
        return jnp.where(self.on[..., None], delta, jnp.zeros((), delta.dtype))  # a select: module docstring

    @property
    def on(self) -> jax.Array | None:
        """[B, T] bool: the tokens the adapter acts on (None: every token)."""
        return None if self.gate is None else self.gate != 0


def attach(model, config: AdapterConfig, seed: int = 0):
    """Give `model` (in place) a fresh adapter, which leaves its function unchanged; returns it."""
    model.adapter = nnx.data(Adapter(model.config, config, nnx.Rngs(seed)))
    return model
