"""Lossless drafting: whatever the adapter drafts, the output is the base model's autoregressive output.

References: transformers' greedy generate on the base weights (tiny models), our seeded AR sampling
(the sampling definition), and plain causal forward passes without a cache for what each layout's
verifier and drafter predict. The adapters here are random (their B is drawn, not zero), so the
drafts differ from the base model's predictions and the verification really decides.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cllm_jax.decode import drafting
from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import Sampling
from cllm_jax.model import adapter as adapter_lib
from cllm_jax.model.kv_cache import KVCache
from tests.tiny import decode, port, random_prompts, torch_greedy, torch_model

EOS = 2
PROMPTS = random_prompts([5, 11, 17, 3])


def with_random_adapter(model, rank=4, scale=0.3, seed=1, targets=adapter_lib.TARGETS):
    adapter_lib.attach(model, adapter_lib.AdapterConfig(rank=rank, alpha=2.0 * rank, targets=targets))
    for i, target in enumerate(model.adapter.config.targets):
        b = getattr(model.adapter, f"{target}_lora_b")
        b[...] = scale * jax.random.normal(jax.random.key(seed + i), b[...].shape)
    return model


def make_pair(kind):
    """(torch reference, our model of the same weights carrying a random adapter, (an EOS, transformers'
    greedy outputs of PROMPTS with it))."""
    reference = torch_model(kind, num_key_value_heads=2)
    eos = torch_greedy(reference, PROMPTS[0], 40)[5]  # a token the greedy output really makes: a row ends early
    expected = [torch_greedy(reference, p, 40, eos_token_id=eos) for p in PROMPTS]
    return reference, with_random_adapter(port(reference)), (eos, expected)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    return make_pair(request.param)


@pytest.fixture(scope="module")
def llama_pair():
    return make_pair("llama")


# (block size, batch size, blocks in flight, guesses): every n, both batch sizes, rolling and multiblock
SHAPES = [(8, 1, 1, "lookup"), (16, 4, 2, "prefix-sample"), (32, 4, 1, "lookup")]


@pytest.mark.parametrize("layout", ["rows", "gated"])
def test_lossless_greedy_equals_transformers_generate(pair, layout):
    _, model, (eos, expected) = pair
    for block_size, batch_size, blocks, init in SHAPES:
        out = decode(model, PROMPTS, method="jacobi-lossless", layout=layout, block_size=block_size, blocks=blocks,
                     init=init, max_new_tokens=40, eos_id=eos, batch_size=batch_size)
        assert [r.token_ids for r in out] == expected, (block_size, batch_size, blocks, init)
        assert all(1 <= r.forward_passes <= len(r.token_ids) for r in out)
    assert any(len(t) < 40 for t in expected)  # some rows end at their EOS


def test_lossless_seeded_sampling_equals_sampled_ar(llama_pair):
    reference, model, _ = llama_pair
    sampling = Sampling(temperature=0.9, top_k=30, top_p=0.95, seed=7)
    ar = decode(port(reference), PROMPTS, method="ar", max_new_tokens=30, eos_id=EOS, sampling=sampling)
    for layout, batch_size in (("rows", 1), ("gated", 4)):
        out = decode(model, PROMPTS, method="jacobi-lossless", layout=layout, block_size=8, max_new_tokens=30,
                     eos_id=EOS, sampling=sampling, batch_size=batch_size)
        assert [r.token_ids for r in out] == [r.token_ids for r in ar], layout


def _plain_predictions(model, tokens, gate):
    """Greedy predictions of one causal forward pass with no cache: the independent reference."""
    t = tokens.shape[1]
    positions = jnp.arange(t)[None]
    hidden, _ = model(tokens, positions, adapter_gate=gate)
    return np.asarray(jnp.argmax(model.logits(hidden), axis=-1))


@pytest.mark.parametrize("layout", ["rows", "gated"])
def test_each_layout_verifies_with_the_base_and_drafts_with_the_adapter(pair, layout):
    """After a prefill, one pass over a window: the verifier's predictions are the base model's on
    text + window; the drafter's are the adapted model's (rows: adapter on every token; gated: the
    adapter on the window only, over the base model's view of the text)."""
    _, model, _ = pair
    prompt, window = np.array([[5, 9, 11, 30, 7, 3, 21]]), np.array([[44, 17, 90, 8, 61, 12]])
    width = window.shape[1]
    rows, slots = drafting.cache_shape(layout, 1, 64, width)
    cache = KVCache.zeros(model.config, rows, slots)
    first, cache = drafting.start(model, layout, jnp.asarray(prompt), jnp.array([7]), jnp.array([0]), cache,
                                  Sampling())
    positions = jnp.arange(7, 7 + width)[None]
    verified, drafted, _ = drafting.predict(model, layout, jnp.asarray(window), positions, jnp.array([0]), cache,
                                            Sampling())
    text = np.concatenate([prompt, window], axis=1)
    base_gate = jnp.zeros(text.shape)
    draft_gate = jnp.ones(text.shape) if layout == "rows" else jnp.asarray(np.r_[np.zeros(7), np.ones(width)][None])
    assert int(first[0]) == _plain_predictions(model, jnp.asarray(prompt), jnp.zeros(prompt.shape))[0, -1]
    np.testing.assert_array_equal(np.asarray(verified), _plain_predictions(model, jnp.asarray(text), base_gate)[:, 7:])
    np.testing.assert_array_equal(np.asarray(drafted), _plain_predictions(model, jnp.asarray(text), draft_gate)[:, 7:])
    assert (np.asarray(verified) != np.asarray(drafted)).any()  # the random adapter really drafts otherwise


def test_a_zero_adapter_drafts_as_the_base_model_itself(llama_pair):
    """With B = 0 the drafter is the base model: lossless decoding makes rolling Jacobi's passes."""
    reference = llama_pair[0]
    model = port(reference)
    adapter_lib.attach(model, adapter_lib.AdapterConfig(rank=2))
    base = port(reference)
    common = dict(block_size=8, max_new_tokens=40, eos_id=EOS, init="prefix-sample")
    rolling = decode(base, PROMPTS, method="jacobi-rolling", **common)
    for layout in ("rows", "gated"):
        lossless = decode(model, PROMPTS, method="jacobi-lossless", layout=layout, **common)
        assert [r.forward_passes for r in lossless] == [r.forward_passes for r in rolling]


def test_lossless_refuses_a_model_without_adapter(llama_pair):
    with pytest.raises(ValueError, match="adapter"):
        Decoder(port(llama_pair[0]), "jacobi-lossless", block_size=8)


@pytest.mark.slow
def test_smollm2_lossless_equals_ar(smollm2, gsm8k_chat_prompts):
    model = with_random_adapter(copy.copy(smollm2.model), rank=8, scale=0.05)  # the shared fixture stays plain
    common = dict(max_new_tokens=48, eos_id=smollm2.tokenizer.eos_token_id)
    ar = decode(smollm2.model, gsm8k_chat_prompts, method="ar", **common)
    for layout, block_size, batch_size in (("rows", 8, 1), ("gated", 16, 3), ("rows", 32, 3)):
        out = decode(model, gsm8k_chat_prompts, method="jacobi-lossless", layout=layout, block_size=block_size,
                     batch_size=batch_size, **common)
        assert [r.token_ids for r in out] == [r.token_ids for r in ar], (layout, block_size)


# A broken drafter may cost speed, never the text: one NaN element, every value infinite, or finite values
# large enough to overflow once multiplied.
BROKEN_ADAPTERS = {"nan": lambda b: b.at[(0,) * b.ndim].set(jnp.nan), "inf": lambda b: jnp.full_like(b, jnp.inf),
                   "overflow": lambda b: jnp.full_like(b, 3e37)}


def _broken(model, kind):
    broken = copy.deepcopy(model)
    for target in broken.adapter.config.targets:
        b = getattr(broken.adapter, f"{target}_lora_b")
        b[...] = BROKEN_ADAPTERS[kind](b[...])
    return broken


@pytest.mark.parametrize("kind", sorted(BROKEN_ADAPTERS))
def test_lossless_whatever_the_adapter_holds(llama_pair, kind):
    _, model, (eos, expected) = llama_pair
    broken = _broken(model, kind)
    for layout, batch_size in (("rows", 1), ("gated", 4)):
        out = decode(broken, PROMPTS, method="jacobi-lossless", layout=layout, block_size=8, max_new_tokens=40,
                     eos_id=eos, batch_size=batch_size)
        assert [r.token_ids for r in out] == expected, (kind, layout)


@pytest.mark.parametrize("kind", sorted(BROKEN_ADAPTERS))
def test_merging_a_broken_adapter_is_refused_and_leaves_the_model(llama_pair, kind):
    from cllm_jax.errors import InputError
    from cllm_jax.model.llama import merge_adapter

    _, model, _ = llama_pair
    broken = _broken(model, kind)
    before = jax.tree.map(np.asarray, nnx_state(broken))
    with pytest.raises(InputError, match="not finite"):
        merge_adapter(broken)
    assert broken.adapter is not None
    after = jax.tree.map(np.asarray, nnx_state(broken))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True), before, after))


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)
