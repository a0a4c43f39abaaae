"""Logits of our Flax port against transformers' torch models, loaded through our Hugging Face loader."""

import numpy as np
import pytest
import torch

import jax.numpy as jnp

from cllm_jax.model.kv_cache import KVCache
from cllm_jax.weights.load import export_model, load_model
from tests.tiny import random_prompts, torch_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip

VARIANTS = {
    "llama-gqa-untied": ("llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(num_key_value_heads=1, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "linear-rope-scaling": ("llama", dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "qwen2-qkv-bias-untied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2-qkv-bias-tied": ("qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True)),
}


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def our_logits(model, ids):
    ids = jnp.asarray(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, _ = model(ids, positions)
    return np.asarray(model.logits(hidden))


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(name, tmp_path):
    kind, overrides = VARIANTS[name]
    reference = torch_model(kind, initializer_range=0.02, **overrides)
    reference.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config.tie_word_embeddings == reference.config.tie_word_embeddings
    ids = np.array(random_prompts([100, 100], seed=3))  # past original_max_position_embeddings
    diff = np.abs(our_logits(loaded.model, ids) - torch_logits(reference, ids)).max()
    assert diff <= 1e-4, f"{name}: max |logit difference| {diff}"


def test_attention_bias_is_used():
    """Guard against a parity test that passes because biases are zero: make them large."""
    reference = torch_model("qwen2", num_key_value_heads=2)
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.self_attn.q_proj.bias.normal_(0, 1.0)
            layer.self_attn.k_proj.bias.normal_(0, 1.0)
    from tests.tiny import port

    ids = np.array(random_prompts([20]))
    assert np.abs(our_logits(port(reference), ids) - torch_logits(reference, ids)).max() <= 1e-4


def test_cached_passes_equal_one_full_pass():
    """Prefill, then a block, then single tokens through the KV cache == one pass over everything."""
    from tests.tiny import port

    model = port(torch_model("llama", num_key_value_heads=2))
    ids = np.array(random_prompts([40, 40], seed=5))
    full = our_logits(model, ids)
    cache = KVCache.zeros(model.config, 2, 64)
    pieces = []
    for start, stop in [(0, 25), (25, 37), (37, 38), (38, 39), (39, 40)]:
        positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        hidden, cache = model(jnp.asarray(ids[:, start:stop]), positions, cache)
        pieces.append(np.asarray(model.logits(hidden)))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=1e-5)


def test_export_round_trip_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    reference = torch_model("llama", num_key_value_heads=2, tie_word_embeddings=False)
    reference.save_pretrained(tmp_path / "in")
    loaded = load_model(tmp_path / "in")
    export_model(loaded.model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = np.array(random_prompts([30]))
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(reference, ids), atol=1e-5)
    np.testing.assert_allclose(our_logits(load_model(tmp_path / "out").model, ids), torch_logits(reference, ids), atol=1e-4)
