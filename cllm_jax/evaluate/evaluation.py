"""Held-out evaluation: our AR and Jacobi decoding (base model and CLLM) beside transformers' generate.

Every method decodes the same prompts, batch 1, greedy, on one machine in one run. Per method:
TPF, tokens/s, speedup over our AR on the base model, GSM8K exact-match accuracy, and agreement
with the base model's greedy output (identical final answers, identical generations).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from cllm_jax.data.prompts import PromptExample, extract_final_number, gsm8k_final_answer
from cllm_jax.decode.engine import Decoder, DecodeSettings
from cllm_jax.evaluate.baselines import load_torch_model, torch_generate
from cllm_jax.weights.load import LoadedModel


@dataclasses.dataclass(frozen=True)
class MethodRun:
    name: str
    token_ids: list[list[int]]
    forward_passes: list[int]
    seconds: list[float]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 256
    block_size: int = 16
    prompt_lookup_num_tokens: int = 10
    include_transformers: bool = True


def _ours(name, loaded: LoadedModel, prompts, method: str, settings: EvalSettings) -> MethodRun:
    decode = DecodeSettings(
        method=method, max_new_tokens=settings.max_new_tokens, block_size=settings.block_size,
        eos_id=loaded.tokenizer.eos_token_id,
    )  # fmt: skip
    decoder = Decoder(loaded.model, decode)
    decoder.generate(prompts[:1])  # compile outside the timed run (one length bucket per prompt set)
    results = decoder.generate(prompts)
    return MethodRun(name, [r.token_ids for r in results], [r.forward_passes for r in results], [r.seconds for r in results])


def _transformers(name, loaded: LoadedModel, prompts, settings: EvalSettings, lookup: int | None) -> MethodRun:
    model = load_torch_model(loaded.path)
    eos = loaded.tokenizer.eos_token_id
    torch_generate(model, prompts[:1], 4, eos, lookup)  # warm-up
    results = torch_generate(model, prompts, settings.max_new_tokens, eos, lookup)
    # transformers does not report forward passes for generate; TPF is left out (None) for them
    return MethodRun(name, [r.token_ids for r in results], [], [r.seconds for r in results])


def run_methods(
    base: LoadedModel,
    cllm: LoadedModel | None,
    prompts: list[list[int]],
    settings: EvalSettings,
    progress: Callable[[str], None] = lambda name: None,
) -> list[MethodRun]:
    plan = [("ar (base)", base, "ar"), ("jacobi (base)", base, "jacobi")]
    if cllm is not None:
        plan += [("jacobi (cllm)", cllm, "jacobi"), ("jacobi-rolling (cllm)", cllm, "jacobi-rolling")]
    runs = []
    for name, loaded, method in plan:
        progress(name)
        runs.append(_ours(name, loaded, prompts, method, settings))
    if settings.include_transformers:
        for name, lookup in [("transformers generate (base)", None),
                             (f"transformers prompt-lookup {settings.prompt_lookup_num_tokens} (base)",
                              settings.prompt_lookup_num_tokens)]:  # fmt: skip
            progress(name)
            runs.append(_transformers(name, base, prompts, settings, lookup))
    return runs


def score(runs: list[MethodRun], examples: list[PromptExample], decode_text: Callable[[list[int]], str]) -> dict:
    """report.json's per-method figures; the first run (our AR on the base model) is the reference."""
    reference = runs[0]
    reference_answers = [extract_final_number(decode_text(t)) for t in reference.token_ids]
    truth = [gsm8k_final_answer(e.answer) if e.answer else None for e in examples]
    base_speed = sum(len(t) for t in reference.token_ids) / sum(reference.seconds)
    table = {}
    for run in runs:
        tokens = sum(len(t) for t in run.token_ids)
        answers = [extract_final_number(decode_text(t)) for t in run.token_ids]
        speed = tokens / sum(run.seconds)
        table[run.name] = {
            "tpf": tokens / sum(run.forward_passes) if run.forward_passes else None,
            "tokens_per_second": speed,
            "speedup": speed / base_speed,
            "accuracy": float(np.mean([a is not None and a == t for a, t in zip(answers, truth)])),
            "agreement": {
                "final_answer": float(np.mean([a == b for a, b in zip(answers, reference_answers)])),
                "generation": float(np.mean([a == b for a, b in zip(run.token_ids, reference.token_ids)])),
            },
            "tpf_per_prompt": [len(t) / p for t, p in zip(run.token_ids, run.forward_passes)] if run.forward_passes else [],
            "median_seconds_per_prompt": float(np.median(run.seconds)),
        }
    return table
