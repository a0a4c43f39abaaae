"""The placeholder drafter: lossless decoding whatever it drafts, and drafts equal to a plain forward pass.

References: transformers' greedy generate on the base weights (tiny models), our seeded AR sampling
(the sampling definition), and one causal forward of the gated model over [text, placeholders] without
a cache for what the placeholders predict. The drafters here are random (drawn B and placeholder
embeddings), so their drafts differ from the base model's and the verification really decides.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cllm_jax.decode.options import Sampling
from cllm_jax.decode.placeholder import build_tree
from cllm_jax.model import adapter as adapter_lib
from tests.tiny import decode, port, random_prompts, torch_greedy, torch_model

PROMPTS = random_prompts([5, 11, 17, 3])
# Repeating prompts, so that prompt lookup finds matches and its candidate wins some passes.
LOOPING = [[7, 8, 9, 10, 11, 12] * 3, [20, 21, 22, 23] * 4 + [20, 21]]


def with_random_drafter(model, placeholders=8, rank=4, scale=0.3, seed=1):
    config = adapter_lib.AdapterConfig(rank=rank, alpha=2.0 * rank, placeholders=placeholders)
    adapter_lib.attach(model, config, seed=seed)
    for i, target in enumerate(config.targets):
        b = getattr(model.adapter, f"{target}_lora_b")
        b[...] = scale * jax.random.normal(jax.random.key(seed + i), b[...].shape)
    return model


def make_pair(kind):
    reference = torch_model(kind, num_key_value_heads=2)
    eos = torch_greedy(reference, PROMPTS[0], 40)[5]  # a token the greedy output really makes: a row ends early
    prompts = PROMPTS + LOOPING
    expected = [torch_greedy(reference, p, 40, eos_token_id=eos) for p in prompts]
    return reference, with_random_drafter(port(reference)), (eos, prompts, expected)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    return make_pair(request.param)


@pytest.fixture(scope="module")
def llama_pair():
    return make_pair("llama")


# (drafts k, groups, lookup candidate, batch size)
LAYOUTS = [(4, "every", 1, 1), (8, "every", 0, 4), (3, "main", 1, 4), (6, "last", 1, 2), (2, "every", 1, 4)]


def test_placeholder_greedy_equals_transformers_generate(pair):
    _, model, (eos, prompts, expected) = pair
    for drafts, groups, lookup, batch_size in LAYOUTS:
        out = decode(model, prompts, method="lossless-placeholder", drafts=drafts, groups=groups, lookup=lookup,
                     max_new_tokens=40, eos_id=eos, batch_size=batch_size)
        assert [r.token_ids for r in out] == expected, (drafts, groups, lookup, batch_size)
        assert all(1 <= r.forward_passes <= len(r.token_ids) for r in out)
        for r in out:  # every pass after the prefill is counted once, by the length it committed
            assert sum(r.acceptance[0]) == r.forward_passes - 1
    assert any(len(t) < 40 for t in expected)  # some rows end at their EOS


def test_placeholder_seeded_sampling_equals_sampled_ar(llama_pair):
    reference, model, (eos, prompts, _) = llama_pair
    sampling = Sampling(temperature=0.9, top_k=30, top_p=0.95, seed=7)
    ar = decode(port(reference), prompts, method="ar", max_new_tokens=30, eos_id=eos, sampling=sampling)
    for drafts, batch_size in ((4, 1), (8, 4)):
        out = decode(model, prompts, method="lossless-placeholder", drafts=drafts, max_new_tokens=30, eos_id=eos,
                     sampling=sampling, batch_size=batch_size)
        assert [r.token_ids for r in out] == [r.token_ids for r in ar], drafts


def test_two_candidates_accept_the_longer_of_the_two_verified_alone(llama_pair):
    """Per pass the committed length is the larger candidate's: the histograms say so row by row."""
    _, model, (eos, prompts, _) = llama_pair
    out = decode(model, prompts, method="lossless-placeholder", drafts=4, lookup=1, max_new_tokens=40, eos_id=eos)
    for r in out:
        committed, drafter, lookup = (np.array(h) for h in r.acceptance)
        lengths = np.arange(len(committed))
        # The committed length is at least each candidate's, so its mean is at least each mean, and a pass
        # accepts more than one token exactly when one of the two candidates does.
        assert (committed * lengths).sum() >= max((drafter * lengths).sum(), (lookup * lengths).sum())
        assert committed[1] <= min(drafter[1], lookup[1])
    assert sum(np.array(r.acceptance[2])[2:].sum() for r in out) > 0  # lookup really won passes


def test_drafts_equal_a_plain_forward_of_the_gated_model(llama_pair):
    """What the placeholders after a token predict equals one cacheless forward over [text, placeholders]."""
    _, model, _ = llama_pair
    k, vocab = 4, model.config.vocab_size
    text = jnp.array([PROMPTS[1]])
    tokens = jnp.concatenate([text, vocab + jnp.arange(k)[None]], axis=1)
    positions = jnp.arange(tokens.shape[1])[None]
    gate = (tokens >= vocab).astype(jnp.float32)
    hidden, _ = model(tokens, positions, adapter_gate=gate)
    plain = jnp.argmax(model.logits(hidden), axis=-1)[0, -k:]

    from cllm_jax.decode.placeholder import _row_mask
    from cllm_jax.model.kv_cache import KVCache

    # The same through the decoding layout: the text cached by the base, the placeholders in scratch slots.
    length = 64
    cache = KVCache.zeros(model.config, 1, length)
    n = text.shape[1]
    _, cache = model(text, positions[:, :n], cache, adapter_gate=jnp.zeros(text.shape))
    tree = build_tree(k, "last", False)
    slots = jnp.arange(length - k, length)[None]
    ph_positions = n + jnp.arange(k)[None]
    mask = (jnp.arange(length)[None, None] < n) | ((jnp.arange(length)[None, None] >= length - k)
                                                   & (jnp.arange(length)[None, None] <= slots[:, :, None]))
    hidden, _ = model(vocab + jnp.arange(k)[None], ph_positions, cache, mask=mask, slots=slots,
                      adapter_gate=jnp.ones((1, k)))
    cached = jnp.argmax(model.logits(hidden), axis=-1)[0]
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(plain))
    assert tree.size == 2 * k + 1 and _row_mask is not None


def test_tree_layouts():
    every = build_tree(4, "every", True)
    assert every.size == (1 + 2 * 4) + (1 + 2 * 4) * 4  # the window, lookup, a group after each of 9 tokens
    assert build_tree(4, "every", False).size == 5 + 5 * 4  # the paper's quadratic layout: 1 + k + k^2
    assert build_tree(4, "last", False).size == 5 + 4
    # A lookup token sees the window's first token and its own branch, never the drafter's tokens.
    lookup_first = every.candidates[1, 1]
    assert every.visible[lookup_first].nonzero()[0].tolist() == [0, lookup_first]


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
def test_placeholder_lossless_whatever_the_drafter_holds(llama_pair, kind):
    _, model, (eos, prompts, expected) = llama_pair
    broken = copy.deepcopy(model)
    fill = {"nan": jnp.nan, "inf": jnp.inf, "overflow": 3e37}[kind]
    for target in broken.adapter.config.targets:
        b = getattr(broken.adapter, f"{target}_lora_b")
        b[...] = b[...].at[(0,) * b.ndim].set(fill) if kind == "nan" else jnp.full_like(b[...], fill)
    broken.adapter.placeholders[...] = jnp.full_like(broken.adapter.placeholders[...], fill)
    out = decode(broken, prompts, method="lossless-placeholder", drafts=4, max_new_tokens=40, eos_id=eos, batch_size=4)
    assert [r.token_ids for r in out] == expected


def test_the_resolver_sends_a_placeholder_drafter_to_its_method_and_refuses_the_rest():
    from cllm_jax.decode.registry import resolve_method
    from cllm_jax.errors import ConfigError

    for name in ("jacobi-rolling", "jacobi-multiblock", "lossless-placeholder"):
        assert resolve_method(name, True, False, placeholder_drafter=True).method.name == "lossless-placeholder"
    assert resolve_method("ar", True, False, placeholder_drafter=True).adapter == "set_aside"
    with pytest.raises(ConfigError, match="placeholder drafter"):
        resolve_method("jacobi-lossless", True, False, placeholder_drafter=True)
    with pytest.raises(ConfigError, match="placeholder drafter"):
        resolve_method("jacobi", True, True, placeholder_drafter=True)  # no merge: it acts on placeholders alone
    with pytest.raises(ConfigError, match="no placeholders"):
        resolve_method("lossless-placeholder", True, False, placeholder_drafter=False)


def test_a_placeholder_drafter_is_never_merged(llama_pair):
    from cllm_jax.errors import InputError
    from cllm_jax.model.llama import merge_adapter

    _, model, _ = llama_pair
    with pytest.raises(InputError, match="cannot be merged"):
        merge_adapter(copy.deepcopy(model))
