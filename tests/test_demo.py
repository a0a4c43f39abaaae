"""`make demo` (decode.py demo): which model it picks, and what it says at the end."""

import os
import shutil

from cllm_jax.evaluate.demo import closing_statement, newest_cllm
from tests.tiny import torch_model


def test_newest_cllm_of_the_base_models_shape(tmp_path):
    base = tmp_path / "base"
    torch_model("llama").save_pretrained(base)
    runs = tmp_path / "runs"
    assert newest_cllm(runs, base=str(base)) is None  # nothing trained yet: the demo uses the base model
    older, newer, other = runs / "a" / "train" / "export", runs / "b" / "export", runs / "c" / "train" / "export"
    for path in (older, newer):
        shutil.copytree(base, path)
    torch_model("llama", hidden_size=32, num_attention_heads=2).save_pretrained(other)  # another architecture
    os.utime(older / "config.json", (1, 1))
    os.utime(other / "config.json", (2**31, 2**31))  # the newest, but not trained from this base
    assert newest_cllm(runs, base=str(base)) == newer
    (runs / "x" / "train").mkdir(parents=True)  # a run still training: no export, not a candidate
    assert newest_cllm(runs, base=str(base)) == newer


def test_closing_statement_names_what_was_shown_and_the_next_command():
    # AR: 100 tokens in 100 passes, 4 s (40 ms a pass); Jacobi: 100 tokens in 95 passes, 9.5 s (100 ms a pass).
    ar = {"tokens_per_forward": 1.0, "tokens_per_second": 25.0, "seconds": 4.0, "forward_passes": 100}
    jacobi = {"tokens_per_forward": 100 / 95, "tokens_per_second": 100 / 9.5, "seconds": 9.5, "forward_passes": 95}
    base = closing_statement(None, jacobi, ar, prompts=4, block_size=16)
    assert "untrained base model" in base and "TPF 1.05" in base and "costs 2.5 one-token passes" in base
    assert "ran at 0.42x AR's speed" in base and base.rstrip().endswith("then rerun `make demo`.") and "`make cllm`" in base
    lossless = closing_statement("runs/a/train/export", {**jacobi, "tokens_per_forward": 2.5}, ar, prompts=4,
                                 block_size=8, lossless=True, identical=4)
    assert "lossless decoding with the adapter runs/a/train/export" in lossless and "4 of 4 answers identical" in lossless
    cllm = closing_statement("runs/x/train/export", {**jacobi, "tokens_per_forward": 1.7}, ar, prompts=4, block_size=16)
    assert "the CLLM runs/x/train/export" in cllm and "1.70 tokens per forward pass" in cllm and "pays only above TPF 2.5" in cllm
    assert cllm.endswith("`.venv/bin/python decode.py chat --model runs/x/train/export`.")


def test_an_adapter_run_of_the_base_is_a_cllm(tmp_path):
    base = tmp_path / "base"
    torch_model("llama").save_pretrained(base)
    export = tmp_path / "runs" / "adapter" / "train" / "export"
    export.mkdir(parents=True)
    (export / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "base_model_name_or_path": "{base}"}}')
    assert newest_cllm(tmp_path / "runs", base=str(base)) == export
    (export / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "another"}')
    assert newest_cllm(tmp_path / "runs", base=str(base)) is None
