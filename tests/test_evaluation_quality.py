"""base_nll_ratio: the base model's NLL of a generation against transformers' torch model, and the
ratio's definition in the evaluation's score (1.0 for the base model's own greedy generations)."""

import types

import numpy as np
import pytest
import torch

from cllm_jax.evaluate.evaluation import MethodRun, generation_nll, score, with_base_nll
from tests.tiny import port, random_prompts, torch_model


@pytest.fixture(scope="module")
def models():
    reference = torch_model("llama", num_key_value_heads=2)
    return reference, port(reference)


def torch_nll(reference, prompt, generation):
    """Summed NLL of the generated tokens, from transformers' logits over the whole sequence."""
    ids = torch.tensor([prompt + generation])
    with torch.no_grad():
        logp = torch.log_softmax(reference(ids).logits[0].double(), -1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(generation) - 1)
    return -logp[rows, torch.tensor(generation)].sum().item()


def test_generation_nll_equals_transformers(models):
    reference, model = models
    prompts = random_prompts([3, 11, 20], seed=4)
    generations = random_prompts([1, 7, 30], seed=5)
    for prompt, generation in zip(prompts, generations):
        ours = generation_nll(model, prompt, generation)
        assert ours == pytest.approx(torch_nll(reference, prompt, generation), rel=1e-4)
    assert generation_nll(model, prompts[0], []) == 0.0


def test_score_reports_the_ratio_against_the_base_greedy(models):
    reference, model = models
    prompts = random_prompts([4, 9], seed=6)
    greedy = [reference.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
              for p in prompts]  # fmt: skip
    other = random_prompts([10, 6], seed=8)  # random text: far less likely under the model than its greedy text
    common = dict(indices=[0, 1], timed=2, seconds=[1.0, 1.0])
    runs = [MethodRun(name="ar (base)", weights="base", method="ar", token_ids=greedy, forward_passes=[10, 10],
                      **common),
            MethodRun(name="drifted (cllm)", weights="cllm", method="jacobi-rolling", token_ids=other,
                      forward_passes=[4, 3], block_size=8, **common)]
    runs = with_base_nll(runs, types.SimpleNamespace(model=model), prompts)
    table = score(runs, lambda index, tokens: True, final_answer=None)

    expected_greedy = sum(torch_nll(reference, p, g) for p, g in zip(prompts, greedy)) / 20
    expected_other = sum(torch_nll(reference, p, g) for p, g in zip(prompts, other)) / 16
    assert table["ar (base)"]["base_nll_ratio"] == 1.0
    assert table["drifted (cllm)"]["base_nll_ratio"] == pytest.approx(expected_other / expected_greedy, rel=1e-4)
    assert table["drifted (cllm)"]["base_nll_ratio"] > 1.0
    assert table["drifted (cllm)"]["block_size"] == 8 and table["ar (base)"]["block_size"] is None
    assert np.isclose(table["drifted (cllm)"]["tpf"], 16 / 7)


def test_repetition_counts_distinct_4grams_and_answers_cut_at_the_limit():
    from cllm_jax.evaluate.report import repetition

    looping = [1, 2, 3, 4, 1, 2, 3, 4]  # 4-grams 1234 2341 3412 4123 1234: 4 distinct of 5
    varied = [5, 6, 7, 8, 9]  # 5678 6789: 2 of 2
    short = [1, 2]  # no 4-gram: not counted in the share
    figures = repetition([looping, varied, short], token_limit=8)
    assert figures["distinct_4gram_share"] == pytest.approx((0.8 + 1.0) / 2)
    assert figures["at_token_limit"] == pytest.approx(1 / 3)


def test_a_method_that_verifies_with_the_base_is_known_by_its_registry_line(monkeypatch):
    """Neither the score nor the report reads a row's name: a new verifying method, whatever it is
    called, is held to the base model's AR text from its registry line alone."""
    import dataclasses

    from cllm_jax.decode import registry

    line = dataclasses.replace(registry.METHODS["jacobi-rolling"], name="speculate", verifies_with_base=True)
    monkeypatch.setitem(registry.METHODS, "speculate", line)
    base_text, cllm_text = [[5, 6, 7], [8, 9]], [[5, 6, 1], [8, 2]]
    common = dict(indices=[0, 1], timed=2, seconds=[1.0, 1.0], base_nll=[1.0, 1.0])
    runs = [MethodRun(name="ar (base)", weights="base", method="ar", token_ids=base_text, forward_passes=[3, 2],
                      **common),
            MethodRun(name="ar (cllm)", weights="cllm", method="ar", token_ids=cllm_text, forward_passes=[3, 2],
                      **common),
            MethodRun(name="fast (cllm)", weights="cllm", method="speculate", token_ids=base_text,
                      forward_passes=[1, 1], **common),
            MethodRun(name="lossy (cllm)", weights="cllm", method="jacobi-rolling", token_ids=cllm_text,
                      forward_passes=[1, 1], **common)]
    table = score(runs, lambda index, tokens: True)
    assert [table[n]["verifies_with_base"] for n in table] == [False, False, True, False]
    assert table["fast (cllm)"]["agreement"]["own_ar"] == 1.0  # against the base model's AR, not ar (cllm)
    assert table["lossy (cllm)"]["agreement"]["own_ar"] == 1.0  # against its own weights' AR
