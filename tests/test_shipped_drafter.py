"""The drafter that ships with the package: it loads by name and decodes the real SmolLM2 losslessly
(its text equal to AR's), it raises the tokens per pass over the base model's own lookup, and a
missing or damaged shipped drafter is one line that names the file."""

import shutil
import subprocess
import sys

import pytest

from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.errors import CheckpointError
from cllm_jax.weights import drafters
from cllm_jax.weights.load import load_model, resolve_adapter
from cllm_jax.weights.peft import PLACEHOLDERS_FILE, WEIGHTS_FILE, load_adapter

NAME = "smollm2-gsm8k"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None)


def test_the_shipped_drafter_loads_by_name_and_decodes_losslessly(smollm2):
    assert NAME in drafters.shipped_names() and drafters.drafter_for(None) == NAME
    card = drafters.card(NAME)
    assert card["base_model"] == "smollm2-135m" and card["training_data"]["blake2b"]
    size = sum(f.stat().st_size for f in drafters.shipped_drafter(NAME).iterdir())
    assert size <= 16 * 2**20  # shipped in bf16
    from cllm_jax.data.sources import load_prompts
    from cllm_jax.data.collect import prompt_ids

    prompts = [prompt_ids(smollm2, example, True) for example in load_prompts("gsm8k-eval", limit=3)]
    eos = smollm2.tokenizer.eos_token_id
    ar = Decoder(smollm2.model, "ar", max_new_tokens=48, eos_id=eos).generate(prompts)
    model = load_adapter(load_model(None).model, resolve_adapter(NAME))
    drafted = Decoder(model, "lossless-placeholder", drafts=4, lookup=0, max_new_tokens=48, eos_id=eos).generate(prompts)
    assert [r.token_ids for r in drafted] == [r.token_ids for r in ar]
    assert summarize(drafted)["tokens_per_forward"] > 1.5  # trained: the drafts alone are accepted


def test_the_shipped_code_drafter_decodes_qwen_losslessly_on_humaneval():
    """qwen-coder, the drafter of the HumanEval recipe: found for its built-in model, under 16 MB, and its
    text on HumanEval prompts is Qwen's own AR text."""
    from cllm_jax.data.humaneval import chat_prompt, humaneval_problems

    assert drafters.drafter_for("qwen2.5-coder-0.5b") == "qwen-coder"
    assert sum(f.stat().st_size for f in drafters.shipped_drafter("qwen-coder").iterdir()) <= 16 * 2**20
    qwen = load_model("qwen2.5-coder-0.5b")
    prompts = [qwen.tokenizer.chat_ids(chat_prompt(problem)) for problem in humaneval_problems()[:2]]
    eos = qwen.tokenizer.eos_token_id
    ar = Decoder(qwen.model, "ar", max_new_tokens=32, eos_id=eos).generate(prompts)
    model = load_adapter(load_model("qwen2.5-coder-0.5b").model, resolve_adapter("qwen-coder"))
    drafted = Decoder(model, "lossless-placeholder", drafts=3, lookup=1, groups="main", max_new_tokens=32,
                      eos_id=eos).generate(prompts)
    assert [r.token_ids for r in drafted] == [r.token_ids for r in ar]
    assert summarize(drafted)["tokens_per_forward"] > 1.5


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_damaged_shipped_drafter_is_one_line_naming_the_file(tmp_path, monkeypatch, damage):
    shipped = tmp_path / "drafters"
    shutil.copytree(drafters.shipped_drafter(NAME), shipped / NAME)
    monkeypatch.setattr(drafters, "SHIPPED_DIR", shipped)
    target = shipped / NAME / (PLACEHOLDERS_FILE if damage == "missing" else WEIGHTS_FILE)
    if damage == "missing":
        target.unlink()
        with pytest.raises(CheckpointError, match=PLACEHOLDERS_FILE):
            resolve_adapter(NAME)
    else:
        target.write_bytes(target.read_bytes()[:1000])
        with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
            load_adapter(load_model(None).model, resolve_adapter(NAME))


def test_decode_cli_with_a_damaged_shipped_drafter_says_one_line(tmp_path):
    """The command line, in a copy of the package whose drafter lost its weights."""
    package = tmp_path / "pkg"
    shutil.copytree("cllm_jax", package / "cllm_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy("decode.py", package / "decode.py")
    (package / "cllm_jax" / "drafters" / NAME / WEIGHTS_FILE).unlink()
    out = subprocess.run([sys.executable, "decode.py", "--draft-adapter", NAME, "--method", "lossless-placeholder",
                          "--prompt", "hi", "--max-new-tokens", "4"], cwd=package, capture_output=True, text=True)
    assert out.returncode != 0
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and WEIGHTS_FILE in lines[0] and "Traceback" not in out.stderr, out.stderr
