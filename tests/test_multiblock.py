"""Multiblock Jacobi decoding and rejection recycling on tiny random models: exactly AR's output,
rolling Jacobi's passes when reduced to one block, and hand-counted passes where acceptance is certain."""

import jax.numpy as jnp
import pytest

from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import Sampling
from tests.tiny import port, random_prompts, torch_model, decode as tiny_decode

EOS = 2
PROMPTS = random_prompts([5, 11, 17, 3])  # different lengths in one batch


@pytest.fixture(scope="module")
def model():
    return port(torch_model("llama", num_key_value_heads=2))


@pytest.fixture(scope="module")
def ar(model):
    """Our AR (itself checked against transformers' generate in test_decoding.py), no EOS and with EOS."""
    plain = decode(model, method="ar", max_new_tokens=40)
    stop = plain[0].token_ids[5]  # a token the greedy output really produces mid-window: rows end at different times
    return {None: plain, stop: decode(model, method="ar", max_new_tokens=40, eos_id=stop)}


def decode(model, prompts=PROMPTS, **settings):
    return tiny_decode(model, prompts, **settings)


@pytest.mark.parametrize(
    "blocks, block_size, spawn_ratio, recycle, batch_size",
    [
        (1, 4, 1.0, 0, 4),
        (2, 4, 0.85, 0, 1),
        (2, 8, 0.25, 0, 4),  # a low ratio spawns a block behind the first on nearly every pass
        (3, 4, 0.5, 0, 3),
        (3, 2, 0.1, 2, 4),
        (2, 4, 0.5, 4, 2),
    ],
)
def test_multiblock_greedy_equals_ar(model, ar, blocks, block_size, spawn_ratio, recycle, batch_size):
    for eos, expected in ar.items():
        out = decode(model, method="jacobi-multiblock", max_new_tokens=40, eos_id=eos, block_size=block_size,
                     blocks=blocks, spawn_ratio=spawn_ratio, recycle=recycle, batch_size=batch_size)  # fmt: skip
        assert [r.token_ids for r in out] == [r.token_ids for r in expected], eos
        for r in out:
            assert 1 <= r.forward_passes <= len(r.token_ids)  # every pass after the prefill settles a token
    assert any(len(r.token_ids) < 40 for r in ar[list(ar)[1]])  # the EOS case really stops rows early


def test_rolling_with_recycling_equals_ar(model, ar):
    for eos, expected in ar.items():
        out = decode(model, method="jacobi-rolling", recycle=3, max_new_tokens=40, eos_id=eos, block_size=4,
                     batch_size=4)
        assert [r.token_ids for r in out] == [r.token_ids for r in expected]


def test_one_block_is_rolling_jacobi(model):
    """K = 1 without recycling must make rolling Jacobi's passes, not just its tokens (independent code)."""
    common = dict(max_new_tokens=40, eos_id=EOS, block_size=4, batch_size=4)
    rolling = decode(model, method="jacobi-rolling", **common)
    for ratio in (1.0, 0.5):
        multi = decode(model, method="jacobi-multiblock", blocks=1, spawn_ratio=ratio, **common)
        for a, b in zip(multi, rolling):
            assert (a.token_ids, a.forward_passes, a.blocks) == (b.token_ids, b.forward_passes, b.blocks)
            assert (a.fast_forwarded, a.stationary) == (b.fast_forwarded, b.stationary)


def test_seeded_sampling_equals_sampled_ar(model):
    sampling = Sampling(temperature=0.9, top_k=30, seed=5)
    expected = decode(model, method="ar", max_new_tokens=30, eos_id=EOS, sampling=sampling)
    out = decode(model, method="jacobi-multiblock", max_new_tokens=30, eos_id=EOS, sampling=sampling, block_size=4,
                 blocks=2, spawn_ratio=0.5, recycle=2, batch_size=4)  # fmt: skip
    assert [r.token_ids for r in out] == [r.token_ids for r in expected]


def test_pass_counts_where_every_guess_is_right():
    """A model whose greedy token is always 0, guesses all 0 (`pad`): every live token is accepted.

    Counted by hand for 40 new tokens, n = 4: rolling accepts its window of 4 per pass, so the prefill
    plus 10 passes. Multiblock with K = 2: the first pass accepts 4 and completes the first block, so a
    second spawns; from then on each pass accepts both blocks (8 tokens) and spawns again: 4 + 4 * 8 =
    36 after 5 passes, the 6th takes the last 4, so 7 passes with the prefill.
    """
    reference = torch_model("llama", num_key_value_heads=2)
    reference.model.norm.weight.data.zero_()  # hidden state 0 -> all logits 0 -> argmax is token 0
    constant = port(reference)
    prompts = random_prompts([5, 9])
    common = dict(max_new_tokens=40, block_size=4, init="pad", pad_id=0, batch_size=2)
    rolling = decode(constant, prompts, method="jacobi-rolling", **common)
    multi = decode(constant, prompts, method="jacobi-multiblock", blocks=2, **common)
    recycled = decode(constant, prompts, method="jacobi-multiblock", blocks=2, recycle=2, **common)
    for r in rolling + multi + recycled:
        assert r.token_ids == [0] * 40
    assert [r.forward_passes for r in rolling] == [11, 11]
    assert [r.forward_passes for r in multi] == [7, 7]
    assert [r.forward_passes for r in recycled] == [7, 7]
    assert multi[0].tokens_per_forward == 40 / 7


def test_recycling_verifies_a_rejected_ngram(model):
    """The pool really feeds candidates: on these prompts some pass accepts a recycled n-gram, so
    recycling needs fewer passes in total than the same decoding without it."""
    common = dict(method="jacobi-rolling", max_new_tokens=40, block_size=4, batch_size=4)
    plain = decode(model, **common)
    recycled = decode(model, recycle=4, **common)
    assert sum(r.forward_passes for r in recycled) < sum(r.forward_passes for r in plain)


def test_cache_is_returned_per_prompt_row(model):
    """With recycling the decoder keeps B * (1 + P) cache rows inside; the caller gets B back, reusable."""
    decoder = Decoder(model, **dict(method="jacobi-multiblock", max_new_tokens=12, block_size=4, recycle=3))
    first = decoder.generate(PROMPTS[:1])
    again = decoder.generate(PROMPTS[:1])
    assert first[0].token_ids == again[0].token_ids
    (cache,) = decoder._caches.values()
    assert cache.keys.shape[1] == 1 and jnp.isfinite(cache.keys).all()


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_smollm2_multiblock_and_recycling_equal_ar(smollm2, gsm8k_chat_prompts, block_size):
    prompts = gsm8k_chat_prompts[:2]
    common = dict(max_new_tokens=32, eos_id=smollm2.tokenizer.eos_token_id)
    ar = Decoder(smollm2.model, **dict(method="ar", batch_size=2, **common)).generate(prompts)
    for batch_size, recycle in ((4, 0), (1, 2)):  # batch 4: the two prompts and two padding copies
        settings = dict(method="jacobi-multiblock", block_size=block_size, blocks=2, recycle=recycle,
                                  batch_size=batch_size, **common)  # fmt: skip
        out = Decoder(smollm2.model, **settings).generate(prompts)
        assert [r.token_ids for r in out] == [r.token_ids for r in ar], (batch_size, recycle)
