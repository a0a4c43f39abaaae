"""Logits of our Flax port against transformers' torch models, loaded through our Hugging Face loader."""

import jax
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


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_each_submodule_matches_transformers(kind):
    """Module by module on the first layer (embedding, norms, q/k/v projections, attention output,
    MLP) and at the top (final norm, head), against torch forward hooks: a mismatch names its module."""
    from cllm_jax.model import layers as L
    from cllm_jax.model.llama import layer_arrays
    from tests.tiny import port

    reference = torch_model(kind, num_key_value_heads=2, initializer_range=0.02)
    model = port(reference)
    ids = np.array(random_prompts([12], seed=5))
    seen = {}
    layer = reference.model.layers[0]
    modules = {"embedding": reference.model.embed_tokens, "input norm": layer.input_layernorm,
               "q_proj": layer.self_attn.q_proj, "k_proj": layer.self_attn.k_proj, "v_proj": layer.self_attn.v_proj,
               "attention": layer.self_attn, "post-attention norm": layer.post_attention_layernorm, "mlp": layer.mlp,
               "final norm": reference.model.norm, "head": reference.lm_head}  # fmt: skip

    def keep(name):
        def hook(module, inputs, output):  # returns None: the module's output is left as it is
            seen[name] = (output[0] if isinstance(output, tuple) else output).detach().numpy()
        return hook

    hooks = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    with torch.no_grad():
        reference(torch.tensor(ids))
    for h in hooks:
        h.remove()

    config, params = model.config, layer_arrays(model)[0]
    tokens = jnp.asarray(ids)
    positions = jnp.arange(ids.shape[1])[None]

    def project(h, name):
        out = h @ params[f"{name}_proj"]
        return out + params[f"{name}_bias"] if config.attention_bias else out

    x = jnp.take(model.embed[...], tokens, axis=0)
    h = L.rms_norm(x, params["attn_norm"], config.rms_norm_eps)
    q, k, v = (project(h, n) for n in ("q", "k", "v"))
    cos, sin = L.rope_tables(config, positions)
    shape = lambda t, heads: t.reshape(1, -1, heads, config.head_dim)  # noqa: E731
    causal = jnp.tril(jnp.ones((1, ids.shape[1], ids.shape[1]), bool))
    attn = L.grouped_attention(L.apply_rope(shape(q, config.num_heads), cos, sin),
                               L.apply_rope(shape(k, config.num_kv_heads), cos, sin), shape(v, config.num_kv_heads),
                               causal).reshape(1, ids.shape[1], -1) @ params["o_proj"]
    h2 = L.rms_norm(x + attn, params["mlp_norm"], config.rms_norm_eps)
    mlp = (jax.nn.silu(h2 @ params["gate_proj"]) * (h2 @ params["up_proj"])) @ params["down_proj"]
    hidden, _ = model(tokens, positions)
    ours = {"embedding": x, "input norm": h, "q_proj": q, "k_proj": k, "v_proj": v, "attention": attn,
            "post-attention norm": h2, "mlp": mlp, "final norm": hidden, "head": model.logits(hidden)}
    for name, value in ours.items():
        np.testing.assert_allclose(np.asarray(value), seen[name], atol=2e-5, rtol=1e-4, err_msg=name)
