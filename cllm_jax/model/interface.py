"""The causal-LM interface decoding and training use, and the model families behind it.

Decoding and training see a model only through `CausalLM`: a forward pass over explicit positions
with an optional fixed-size KV cache, a custom mask, write slots and an adapter gate; `logits` of
hidden states; its `config`; its optional `adapter`. Its parameters are an nnx state whose leaves
are named by the family's `PARAM_AXES` (logical axes for the mesh, cllm_jax/parallel/mesh.py) and
which the family's weight converter maps from and to Hugging Face tensors.

A second family is a module beside llama.py implementing this, a `FAMILIES` entry for its
`config.json` model types, its converter in cllm_jax/weights/, and its own parity test against
transformers (tests/test_model_parity.py shows the pattern, module by module).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax

from cllm_jax.config import ModelConfig
from cllm_jax.errors import ConfigError
from cllm_jax.model import llama
from cllm_jax.model.kv_cache import KVCache


@runtime_checkable
class CausalLM(Protocol):
    config: ModelConfig
    adapter: object | None  # cllm_jax.model.adapter.Adapter, or None

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 mask: jax.Array | None = None, remat: bool | str = False, *, adapter_gate: jax.Array | None = None,
                 slots: jax.Array | None = None, adapter_rng: jax.Array | None = None,
                 ) -> tuple[jax.Array, KVCache | None]:  # fmt: skip
        """Final-normed hidden states [B, T, D] and the updated cache."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 vocabulary logits of hidden states of any leading shape."""


# config.json model_type -> the module implementing it (its model class, PARAM_AXES, layer shapes)
FAMILIES = {"llama": llama, "qwen2": llama, "mistral": llama}


def family(config: ModelConfig):
    if config.model_type not in FAMILIES:
        raise ConfigError(f"model_type {config.model_type!r} has no implementation (known: {', '.join(FAMILIES)})")
    return FAMILIES[config.model_type]


def param_axes(config: ModelConfig | None = None) -> dict[str, tuple]:
    """Logical axes of every parameter by name (the family's table; the LLaMA one by default)."""
    return (llama if config is None else family(config)).PARAM_AXES
