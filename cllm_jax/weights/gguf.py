"""Read a llama.cpp GGUF file into Hugging Face tensor names, config and tokenizer (numpy only)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from cllm_jax.errors import CheckpointError
from cllm_jax.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
_ARCHITECTURE_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFModel:
    hf_config: dict
    tensors: dict[str, np.ndarray]  # Hugging Face names, float32, torch layout
    tokenizer: Tokenizer
    architecture: str


def hf_name(gguf_name: str) -> str:
    """The Hugging Face name of a GGUF tensor, e.g. blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{kind}"
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _PER_LAYER:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_PER_LAYER[part]}.{kind}"
    raise CheckpointError(f"unexpected tensor {gguf_name!r} in the GGUF file: this variant is not supported")


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> Hugging Face rotate-half).

    Per head, llama.cpp stores row pairs (i, i + d/2) next to each other; reading the rows as
    (heads, d/2, 2) and swapping the last two axes puts each half back in one block.
    """
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _float(value) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06. Keep the shortest float32 spelling.
    return float(str(np.float32(value)))


def _hf_config(meta: dict, arch: str, names: set[str], vocab_size: int) -> dict:
    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    if hidden is None or heads is None or get("block_count") is None:
        raise CheckpointError(f"GGUF file lacks {arch}.embedding_length/attention.head_count/block_count metadata")
    rope_theta = _float(get("rope.freq_base", 10000.0))
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    config = {
        "model_type": arch,
        "architectures": [_ARCHITECTURE_CLASSES[arch]],
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length", hidden // heads),
        "rms_norm_eps": _float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "max_position_embeddings": get("context_length", 2048),
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        rope_scaling = {"rope_type": scaling, "factor": _float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = get("rope.scaling.original_context_length")
        config["rope_scaling"] = rope_scaling
        rope_parameters.update(rope_scaling)
    # transformers 5 keeps RoPE settings only in `rope_parameters`; `rope_theta`/`rope_scaling`
    # above are the older spellings, kept because much code still reads them.
    config["rope_parameters"] = rope_parameters
    return config


def read_gguf(path: str | os.PathLike) -> GGUFModel:
    """Dequantize a llama/qwen2 GGUF into float32 Hugging Face tensors, with its config and tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # the reader raises assorted errors (ValueError, struct/memmap errors) on bad files
        raise CheckpointError(f"cannot read GGUF file {path} ({e}): the file is corrupt or not GGUF") from e
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    names = {t.name for t in reader.tensors}
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise CheckpointError(f"GGUF file {path} has no token_embd.weight: the file is incomplete")
    # GGUF shapes list the fastest-varying dimension first; the embedding's last one is the vocab.
    config = _hf_config(meta, arch, names, vocab_size=int(embed.shape[-1]))

    tensors = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))  # torch order: [out, in]
        try:
            array = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError) as e:  # e.g. a quantization type gguf cannot decode
            raise CheckpointError(f"cannot dequantize tensor {t.name} of {path} ({e}): re-export the GGUF") from e
        # Only llama's converter permutes Q and K; qwen2 files keep the Hugging Face layout.
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = unpermute_rows(array, config["num_attention_heads"])
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = unpermute_rows(array, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(array)

    return GGUFModel(
        hf_config=config, tensors=tensors, tokenizer=Tokenizer.from_gguf_metadata(meta), architecture=arch
    )
