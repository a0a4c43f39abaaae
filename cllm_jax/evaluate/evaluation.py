"""Held-out evaluation: our AR and Jacobi decoding (base model and CLLM) beside transformers' generate.

Every method decodes the same prompts, batch 1, greedy, on one machine in one run, each Jacobi
method at every block size asked for. Per method: TPF, tokens/s, speedup over our AR on the base
model, GSM8K exact-match accuracy, agreement with the base model's greedy output (identical final
answers, identical generations), and `base_nll_ratio`: how far the text drifts from the base model,
as the base model's mean NLL per generated token of the method's generations divided by that of the
base model's own greedy generations (so 1.0 for any method that reproduces the base greedy output).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.data.prompts import PromptExample, extract_final_number, gsm8k_final_answer
from cllm_jax.decode.engine import Decoder, DecodeSettings
from cllm_jax.decode.prefill import bucket_length
from cllm_jax.evaluate.baselines import load_torch_model, torch_generate
from cllm_jax.train.losses import ar_loss
from cllm_jax.weights.load import LoadedModel


@dataclasses.dataclass(frozen=True)
class MethodRun:
    name: str
    token_ids: list[list[int]]
    forward_passes: list[int]
    seconds: list[float]
    block_size: int | None = None  # Jacobi methods only
    base_nll: list[float] | None = None  # per generation: the base model's summed NLL of its tokens


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 256
    block_size: int = 16
    prompt_lookup_num_tokens: int = 10
    include_transformers: bool = True
    block_sizes: tuple[int, ...] = ()  # every Jacobi method at each n (default: block_size alone)
    blocks: int = 2  # multiblock: K blocks in flight
    spawn_ratio: float = 0.85
    recycle: int = 4  # the "+ recycling" method's pool of rejected tails (0: no such method)
    lookup: bool = True  # rolling Jacobi with prompt-lookup guesses (init "lookup"), base model and CLLM

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.block_sizes) or (self.block_size,)


def decode_run(name, loaded: LoadedModel, prompts, method: str, settings: EvalSettings, block_size=None, recycle=0,
               init="prefix-sample") -> MethodRun:  # fmt: skip
    """One method of ours over every prompt, batch 1, compiled before the timed run."""
    decode = DecodeSettings(
        method=method, max_new_tokens=settings.max_new_tokens, block_size=block_size or settings.block_size,
        init=init, eos_id=loaded.tokenizer.eos_token_id, blocks=settings.blocks, spawn_ratio=settings.spawn_ratio,
        recycle=recycle,
    )  # fmt: skip
    decoder = Decoder(loaded.model, decode)
    decoder.generate(prompts[:1])  # compile outside the timed run (one length bucket per prompt set)
    results = decoder.generate(prompts)
    return MethodRun(name, [r.token_ids for r in results], [r.forward_passes for r in results],
                     [r.seconds for r in results], block_size)  # fmt: skip


@jax.jit
def _summed_nll(model, tokens: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    hidden, _ = model(tokens, positions)
    return ar_loss(model.logits(hidden), labels, weights, denom=1.0)  # denom 1: the sum, not the mean


def generation_nll(model, prompt: list[int], generation: list[int]) -> float:
    """The model's summed NLL of `generation` after `prompt`: one teacher-forced forward pass.

    The sequence is padded to a power-of-two bucket at the end (the causal mask keeps padding out of
    the positions read, and their weights are 0), so a few compilations serve a whole evaluation.
    """
    if not generation:
        return 0.0
    ids = list(prompt) + list(generation)
    length = bucket_length(len(ids))
    tokens, labels, weights = (np.zeros((1, length), dtype) for dtype in (np.int32, np.int32, np.float32))
    tokens[0, : len(ids)] = ids
    labels[0, : len(ids) - 1] = ids[1:]  # position t predicts token t + 1
    weights[0, len(prompt) - 1 : len(ids) - 1] = 1.0  # only the generated tokens count
    return float(_summed_nll(model, tokens, labels, weights))


def with_base_nll(runs: list[MethodRun], base: LoadedModel, prompts: list[list[int]]) -> list[MethodRun]:
    """Fill every run's base_nll; identical generations (most methods reproduce one another) are scored once."""
    memo: dict[tuple, float] = {}
    out = []
    for run in runs:
        nll = []
        for prompt, generation in zip(prompts, run.token_ids):
            key = (tuple(prompt), tuple(generation))
            if key not in memo:
                memo[key] = generation_nll(base.model, prompt, generation)
            nll.append(memo[key])
        out.append(dataclasses.replace(run, base_nll=nll))
    return out


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
    sizes = settings.sizes
    plan = [("ar (base)", base, "ar", None, 0, "prefix-sample")]
    for n in sizes:
        suffix = f" n={n}" if len(sizes) > 1 else ""  # one size keeps the plain names
        plan.append((f"jacobi (base){suffix}", base, "jacobi", n, 0, "prefix-sample"))
        if settings.lookup:  # what lookup alone gives, without consistency training
            plan.append((f"jacobi-rolling + lookup (base){suffix}", base, "jacobi-rolling", n, 0, "lookup"))
        if cllm is not None:
            plan += [
                (f"jacobi (cllm){suffix}", cllm, "jacobi", n, 0, "prefix-sample"),
                (f"jacobi-rolling (cllm){suffix}", cllm, "jacobi-rolling", n, 0, "prefix-sample"),
                (f"jacobi-multiblock (cllm){suffix}", cllm, "jacobi-multiblock", n, 0, "prefix-sample"),
            ]
            if settings.recycle:  # 0 leaves the row out: on CPU each candidate row costs a whole window
                plan.append((f"jacobi-multiblock + recycling (cllm){suffix}", cllm, "jacobi-multiblock", n,
                             settings.recycle, "prefix-sample"))  # fmt: skip
            if settings.lookup:
                plan.append((f"jacobi-rolling + lookup (cllm){suffix}", cllm, "jacobi-rolling", n, 0, "lookup"))
    runs = []
    for name, loaded, method, n, recycle, init in plan:
        progress(name)
        runs.append(decode_run(name, loaded, prompts, method, settings, n, recycle, init))
    if settings.include_transformers:
        for name, lookup in [("transformers generate (base)", None),
                             (f"transformers prompt-lookup {settings.prompt_lookup_num_tokens} (base)",
                              settings.prompt_lookup_num_tokens)]:  # fmt: skip
            progress(name)
            runs.append(_transformers(name, base, prompts, settings, lookup))
    progress("base-model NLL of every generation")
    return with_base_nll(runs, base, prompts)


def score(runs: list[MethodRun], examples: list[PromptExample], decode_text: Callable[[list[int]], str]) -> dict:
    """report.json's per-method figures; the first run (our AR on the base model) is the reference."""
    reference = runs[0]

    def mean_nll(run):  # per generated token, pooled over the prompts
        return sum(run.base_nll) / max(1, sum(len(t) for t in run.token_ids)) if run.base_nll is not None else None

    reference_nll = mean_nll(reference)
    reference_answers = [extract_final_number(decode_text(t)) for t in reference.token_ids]
    truth = [gsm8k_final_answer(e.answer) if e.answer else None for e in examples]
    base_speed = sum(len(t) for t in reference.token_ids) / sum(reference.seconds)
    table = {}
    for run in runs:
        tokens = sum(len(t) for t in run.token_ids)
        answers = [extract_final_number(decode_text(t)) for t in run.token_ids]
        speed = tokens / sum(run.seconds)
        nll = mean_nll(run)
        table[run.name] = {
            "tpf": tokens / sum(run.forward_passes) if run.forward_passes else None,
            "tokens_per_second": speed,
            "speedup": speed / base_speed,
            "accuracy": float(np.mean([a is not None and a == t for a, t in zip(answers, truth)])),
            "agreement": {
                "final_answer": float(np.mean([a == b for a, b in zip(answers, reference_answers)])),
                "generation": float(np.mean([a == b for a, b in zip(run.token_ids, reference.token_ids)])),
            },
            "base_nll_ratio": nll / reference_nll if nll is not None and reference_nll else None,
            "base_nll_per_token": nll,
            "block_size": run.block_size,
            "tpf_per_prompt": [len(t) / p for t, p in zip(run.token_ids, run.forward_passes)] if run.forward_passes else [],
            "median_seconds_per_prompt": float(np.median(run.seconds)),
        }
    return table
