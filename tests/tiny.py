"""Tiny random LLaMA-family models: a torch reference from transformers and our port of the same weights."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from cllm_jax.config import ModelConfig
from cllm_jax.weights.convert import model_from_hf_tensors

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, bos_token_id=1, eos_token_id=2)  # fmt: skip


def torch_model(kind: str = "llama", seed: int = 0, **overrides):
    """A random transformers model; a larger init than the default makes argmax decisions clear-cut."""
    torch.manual_seed(seed)
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_cls(**{**BASE, "initializer_range": 0.2, **overrides})
    return model_cls(config).eval()


def port(torch_model) -> "Llama":  # noqa: F821
    """Our model with the torch model's weights (converted in memory, no files)."""
    tensors = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
    return model_from_hf_tensors(ModelConfig.from_hf(torch_model.config.to_dict()), tensors)


def random_prompts(lengths, seed=1, low=3, high=128):
    rs = np.random.RandomState(seed)
    return [rs.randint(low, high, n).tolist() for n in lengths]


def torch_greedy(model, prompt, max_new_tokens, eos_token_id=None):
    """transformers' greedy generate: the independent reference for our decoding loops."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos_token_id, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def save_tiny_chat_model(path, seed: int = 0):
    """A tiny random LLaMA with SmolLM2's vocabulary and tokenizer (chat template included).

    Real tokenization and chat prompts, at a tiny model's speed: for end-to-end tests of the
    commands. Returns the torch model.
    """
    import shutil

    from cllm_jax.weights.default_model import default_model_dir

    model = torch_model("llama", seed=seed, vocab_size=49152, num_key_value_heads=2, max_position_embeddings=2048)
    model.save_pretrained(path)
    source = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    return model


def decode(model, prompts, method="ar", batch_size=1, guess_seed=0, **options):
    """Decode with one call pattern for every method: options a method does not take (block_size
    for AR, say) are left out, as the tests run several methods with the same settings."""
    import dataclasses

    from cllm_jax.decode.engine import Decoder
    from cllm_jax.decode.registry import get_method

    known = {f.name for f in dataclasses.fields(get_method(method).options)}
    options = {k: v for k, v in options.items() if k in known}
    return Decoder(model, method, batch_size=batch_size, guess_seed=guess_seed, **options).generate(prompts)
