"""Decoding loops on tiny random models: AR against transformers' generate, Jacobi against AR."""

import jax
import numpy as np
import pytest

from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import Sampling
from cllm_jax.errors import InputError
from tests.tiny import port, random_prompts, torch_greedy, torch_model, decode as tiny_decode

EOS = 2  # a real token of the tiny vocabulary: rows stop at different times


@pytest.fixture(scope="module")
def reference():
    return torch_model("llama", num_key_value_heads=2)


@pytest.fixture(scope="module")
def model(reference):
    return port(reference)


PROMPTS = random_prompts([5, 11, 17, 3])


def decode(model, prompts, **settings):
    return tiny_decode(model, prompts, **settings)


@pytest.mark.parametrize("eos", [None, EOS])
def test_ar_greedy_equals_transformers_generate(model, reference, eos):
    results = decode(model, PROMPTS, method="ar", max_new_tokens=24, eos_id=eos)
    for prompt, result in zip(PROMPTS, results):
        assert result.token_ids == torch_greedy(reference, prompt, 24, eos_token_id=eos)
        assert result.forward_passes == len(result.token_ids)


def test_batched_rows_equal_batch_of_one(model):
    for method in ("ar", "jacobi", "jacobi-rolling"):
        one = decode(model, PROMPTS, method=method, max_new_tokens=20, eos_id=EOS, block_size=4)
        many = decode(model, PROMPTS, method=method, max_new_tokens=20, eos_id=EOS, block_size=4, batch_size=3)
        assert [r.token_ids for r in many] == [r.token_ids for r in one], method


@pytest.mark.parametrize("method", ["jacobi", "jacobi-rolling"])
@pytest.mark.parametrize("block_size", [1, 2, 16, 64])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_jacobi_equals_ar(model, method, block_size, batch_size):
    ar = decode(model, PROMPTS, method="ar", max_new_tokens=40, eos_id=EOS)
    jac = decode(model, PROMPTS, method=method, max_new_tokens=40, eos_id=EOS, block_size=block_size, batch_size=batch_size)
    assert [r.token_ids for r in jac] == [r.token_ids for r in ar]
    for r in jac:
        assert 1 <= r.forward_passes <= len(r.token_ids) + (len(r.token_ids) // block_size + 2) * (block_size + 1)


@pytest.mark.parametrize("init", ["pad", "repeat-last", "random-vocab", "prefix-sample"])
def test_every_initial_guess_reaches_the_same_fixed_point(model, init):
    ar = decode(model, PROMPTS[:2], method="ar", max_new_tokens=30)
    jac = decode(model, PROMPTS[:2], method="jacobi", max_new_tokens=30, block_size=8, init=init)
    assert [r.token_ids for r in jac] == [r.token_ids for r in ar]


def test_eos_inside_a_block_truncates_and_budget_is_exact(model):
    no_eos = decode(model, PROMPTS, method="ar", max_new_tokens=40)
    stop = no_eos[0].token_ids[5]  # a token the greedy output really produces mid-block
    expected = [r.token_ids[: r.token_ids.index(stop) + 1] if stop in r.token_ids else r.token_ids for r in no_eos]
    for method in ("jacobi", "jacobi-rolling"):
        results = decode(model, PROMPTS, method=method, max_new_tokens=40, eos_id=stop, block_size=16, batch_size=4)
        assert [r.token_ids for r in results] == expected, method
    for budget in (1, 7, 17):
        for method in ("ar", "jacobi", "jacobi-rolling"):
            results = decode(model, PROMPTS, method=method, max_new_tokens=budget, block_size=8, batch_size=4)
            assert [r.token_ids for r in results] == [r.token_ids[:budget] for r in no_eos], (method, budget)


def test_seeded_sampling_jacobi_equals_sampled_ar(model):
    """Sampling is defined as argmax of logits/T + Gumbel noise keyed by (row seed, position)."""
    sampling = Sampling(temperature=0.9, top_k=30, top_p=0.95, seed=11)
    ar = decode(model, PROMPTS, method="ar", max_new_tokens=30, eos_id=EOS, sampling=sampling)
    greedy = decode(model, PROMPTS, method="ar", max_new_tokens=30, eos_id=EOS)
    assert [r.token_ids for r in ar] != [r.token_ids for r in greedy]
    for method in ("jacobi", "jacobi-rolling"):
        jac = decode(model, PROMPTS, method=method, max_new_tokens=30, eos_id=EOS, sampling=sampling, block_size=8)
        assert [r.token_ids for r in jac] == [r.token_ids for r in ar]
    batched = decode(model, PROMPTS, method="ar", max_new_tokens=30, eos_id=EOS, sampling=sampling, batch_size=4)
    assert [r.token_ids for r in batched] == [r.token_ids for r in ar]


def test_sampling_filters_restrict_the_support():
    from cllm_jax.decode.sampling import choose_tokens

    logits = jax.numpy.log(jax.numpy.array([[[0.5, 0.3, 0.15, 0.05]]]))
    positions = jax.numpy.arange(200).reshape(1, 200)
    tiled = jax.numpy.broadcast_to(logits, (1, 200, 4))
    top_k = set(np.asarray(choose_tokens(tiled, positions, np.array([0]), Sampling(temperature=1.0, top_k=2))).ravel())
    top_p = set(np.asarray(choose_tokens(tiled, positions, np.array([0]), Sampling(temperature=1.0, top_p=0.7))).ravel())
    assert top_k == {0, 1} and top_p == {0, 1}


def independent_counts(trajectory):
    """Fast-forwarded and stationary tokens from the recorded states alone (their definitions in cllm_jax/decode/jacobi.py)."""
    fast = still = 0
    for states in trajectory:
        fixed = states[-1]

        def correct_prefix(state):
            n = 0
            while n < len(state) and state[n] == fixed[n]:
                n += 1
            return n

        for t in range(1, len(states)):
            before, after = correct_prefix(states[t - 1]), correct_prefix(states[t])
            for i in range(before + 1, after):  # joined the correct prefix in iteration t, beyond the first
                if states[t][i] != states[t - 1][i]:
                    fast += 1
                else:
                    still += 1
    return fast, still


def test_metrics_agree_with_the_recorded_trajectory(model):
    prompts = random_prompts([4, 9, 13, 6, 21, 8], seed=7)
    results = decode(model, prompts, method="jacobi", max_new_tokens=48, block_size=8, record=True, batch_size=3)
    ar = decode(model, prompts, method="ar", max_new_tokens=48)
    assert sum(r.fast_forwarded + r.stationary for r in results) > 0  # the example exercises the counts
    for r, a in zip(results, ar):
        states_per_block = [len(states) for states in r.trajectory]
        # every pass after the prefill is one iteration; the confirming pass adds no new state
        assert r.forward_passes == 1 + sum(states_per_block)
        assert r.tokens_per_forward == len(r.token_ids) / r.forward_passes
        assert (r.fast_forwarded, r.stationary) == independent_counts(r.trajectory)
        fixed_points = [t for states in r.trajectory for t in states[-1]]
        assert fixed_points[: len(a.token_ids)] == a.token_ids
        for states in r.trajectory:  # each block starts from a guess whose first token is already final
            assert all(s[0] == states[-1][0] for s in states)


def test_one_compilation_serves_a_length_bucket(model):
    decoder = Decoder(model, **dict(method="jacobi", max_new_tokens=16, block_size=4))
    results = [decoder.generate([p]) for p in random_prompts([3, 7, 12, 16], seed=2)]
    assert results[0][0].compile_seconds > 0
    assert all(r[0].compile_seconds == 0 for r in results[1:])
    assert len(decoder._compiled) == 1
    decoder.generate(random_prompts([17]))  # the next bucket compiles once more
    assert len(decoder._compiled) == 2


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(InputError, match="outside the vocabulary"):
        decode(model, [[5, 500]], max_new_tokens=4)
    with pytest.raises(InputError, match="exceeds the context"):
        decode(model, [[5] * 500], max_new_tokens=100)
    with pytest.raises(InputError, match="empty"):
        decode(model, [[]], max_new_tokens=4)
