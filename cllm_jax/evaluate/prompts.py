"""Benchmark prompts: GSM8K held-out questions under the chat template, in one length bucket."""

from __future__ import annotations

from cllm_jax.data.prompts import load_prompts
from cllm_jax.decode.prefill import bucket_length


def gsm8k_benchmark_prompts(tokenizer, count: int, bucket: int = 128) -> list[list[int]]:
    """The first `count` eval-split questions whose chat prompt fits `bucket` tokens.

    One bucket means one compilation, so a short benchmark measures decoding, not the compiler.
    """
    chosen = []
    for example in load_prompts("gsm8k-eval"):
        ids = tokenizer.chat_ids(example.prompt)
        if bucket_length(len(ids)) == bucket:
            chosen.append(ids)
        if len(chosen) == count:
            break
    return chosen
