"""Model configuration for the LLaMA family, read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from cllm_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling; `kind` is "linear" or "llama3" (the HF `rope_type`)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Compute dtype of matmuls; softmax, norms and logits stay fp32 whatever this is.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # How the decoder layers run (not part of config.json): "scan" over stacked weights, or
    # "per_layer" (a Python loop; with per-layer weight/cache arrays the fastest on a GPU at 7B).
    # cllm_jax.model.llama.resolve_layer_loop turns "auto" into one of these.
    layer_loop: str = "scan"
    # "xla": the einsum attention of cllm_jax.model.layers; "dot_product": jax.nn.dot_product_attention
    # (cuDNN where the backend, dtype and mask allow); "cudnn": the same, cuDNN required.
    attention: str = "xla"

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides) -> "ModelConfig":
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type '{model_type}' is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        # transformers v5 moved RoPE settings into `rope_parameters`; older files use the two keys.
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling_src = {**legacy_scaling, **rope}
        kind = scaling_src.get("rope_type", scaling_src.get("type", "default"))
        if kind in (None, "default"):
            scaling = None
        elif kind in ("linear", "llama3"):
            scaling = RopeScaling(
                kind=kind,
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling_src.get("original_max_position_embeddings", 8192)),
            )
        else:
            raise ConfigError(f"rope_type '{kind}' is not supported (supported: default, linear, llama3)")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and says so only through its model_type.
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            **overrides,
        )

    def to_hf(self) -> dict[str, Any]:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope_parameters.update(rope_type=s.kind, factor=s.factor)
            if s.kind == "llama3":
                rope_parameters.update(
                    low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings,
                )
        hf = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": "float32",
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        return hf
