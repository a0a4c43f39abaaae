"""decode.py as a user runs it: JSON output, the compare mode, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import torch_model, torch_greedy

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "decode.py"), *args], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model = torch_model("llama", num_key_value_heads=2)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return path, model


def test_json_lines_and_compare(tiny_dir):
    path, reference = tiny_dir
    out = run("--model", str(path), "--prompt-ids", "5,6,7", "--prompt-ids", "9,10", "--method", "jacobi",
              "--block-size", "4", "--max-new-tokens", "12", "--compare", "ar", "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["method"] for line in lines] == ["jacobi", "jacobi", "ar", "ar"]
    for line in lines:
        for field in ("prompt_ids", "token_ids", "text", "forward_passes", "tokens_per_forward", "seconds",
                      "compile_seconds", "iterations_per_block", "fast_forwarded", "stationary"):  # fmt: skip
            assert field in line
    assert lines[0]["token_ids"] == torch_greedy(reference, [5, 6, 7], 12, eos_token_id=2)
    assert lines[0]["token_ids"] == lines[2]["token_ids"]
    assert "speedup of jacobi over ar" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/dir", "--prompt-ids", "1"], "does not exist"),
        (["--prompt-ids", "1,x"], "not a comma-separated list"),
        (["--prompt-ids", "1,100000"], "outside the vocabulary"),
        (["--prompt", "hi"], "no tokenizer"),
        (["--prompt-ids", ",".join(["5"] * 600)], "exceeds the context"),
        (["--prompts", "/no/such/file.jsonl"], "file.jsonl"),
    ],
)
def test_bad_input_is_one_line_error(tiny_dir, args, message, tmp_path):
    path, _ = tiny_dir
    if args[0] != "--model":
        args = ["--model", str(path), *args]
    out = run(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_unreadable_checkpoint_and_corrupt_prompt_file(tiny_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = run("--model", str(broken), "--prompt-ids", "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "config.json" in out.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": \n')
    path, _ = tiny_dir
    out = run("--model", str(path), "--prompts", str(prompts))
    assert out.returncode == 2 and "p.jsonl:2" in out.stderr, out.stderr
