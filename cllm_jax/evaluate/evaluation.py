"""Held-out evaluation: rows of (weights, decoding method), beside transformers' generate.

Every row decodes the same prompts, greedy, on one machine in one run, each Jacobi row at every
block size asked for. A row names its weights (`base`, `cllm`: the pipeline's trained model, or
another model the config names) and a method of cllm_jax/decode/registry.py with its options.
Weights trained as an adapter run as the lossy CLLM (the adapter merged) under a plain method, and
as the drafter of `jacobi-lossless`, whose text is the base model's.

Timing is batch 1. With `timing_limit` set, a row is timed on the first prompts only, and a row
marked `full` also decodes the whole set in batches of `batch_size`, for its quality figures
(batching changes no row's output: rows advance independently); otherwise the timed run is the
whole run. Per row: TPF, tokens/s and the speedup over our AR on the base model (timed prompts),
accuracy (the task's own measure: GSM8K's final number, HumanEval's tests executed), agreement with
the base model's AR output (identical final answers, identical generations), and `base_nll_ratio`:
the base model's mean NLL per generated token of the row's generations over that of its own greedy
generations (1.0 for any method that reproduces the base model's output).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.options import JacobiOptions
from cllm_jax.decode.prefill import bucket_length
from cllm_jax.decode.registry import METHODS, get_method, resolve_method
from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.baselines import load_torch_model, torch_generate
from cllm_jax.model.llama import merge_adapter as merge
from cllm_jax.train.losses import ar_loss
from cllm_jax.weights.load import LoadedModel


@dataclasses.dataclass(frozen=True, kw_only=True)
class Row:
    """One row of the evaluation: a method of the registry on a set of weights."""

    weights: str = "base"
    method: str = "ar"
    options: tuple[tuple[str, object], ...] = ()  # the method's options (block_size and the budget aside)
    full: bool = True  # decode every prompt (quality figures), not only the timed ones
    block_sizes: tuple[int, ...] | None = None  # a Jacobi row's n (None: the evaluation's block_sizes)

    @classmethod
    def from_dict(cls, values: dict) -> "Row":
        values = dict(values)
        sizes = values.pop("block_sizes", None)
        row = cls(weights=str(values.pop("weights", "base")), method=str(values.pop("method", "ar")),
                  full=bool(values.pop("full", True)), options=tuple(sorted(values.items())),
                  block_sizes=None if sizes is None else tuple(int(n) for n in sizes))
        row.make_options(block_size=16, max_new_tokens=8)  # every option checked when the config loads
        return row

    @property
    def jacobi(self) -> bool:
        return issubclass(get_method(self.method).options, JacobiOptions)

    def make_options(self, **values):
        return get_method(self.method).make_options(**dict(self.options), **(values if self.jacobi else {
            k: v for k, v in values.items() if k != "block_size"}))

    def name(self, block_size: int | None, several_sizes: bool) -> str:
        options = dict(self.options)
        label = self.method
        defaults = {f.name: f.default for f in dataclasses.fields(get_method(self.method).options)}
        if "layout" in defaults:  # a method with a layout says which it ran
            label += f" {options.get('layout', defaults['layout'])}"
        if "drafts" in defaults:  # a drafting method: how many it drafts, where, and what it verifies beside them
            label += f" k={options.get('drafts', defaults['drafts'])}"
            if options.get("groups", defaults["groups"]) != defaults["groups"]:
                label += f" groups={options['groups']}"
            if options.get("lookup", defaults["lookup"]):
                label += " + lookup"
        if self.jacobi and options.get("init", "lookup") == "lookup":
            label += " + lookup"
        if options.get("recycle"):
            label += " + recycling"
        label += f" ({self.weights})"
        return label + (f" n={block_size}" if self.jacobi and several_sizes else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodRun:
    name: str
    weights: str
    method: str | None  # the registry's method that decoded it; None for transformers' generate
    indices: list[int]  # which prompts this run decoded
    token_ids: list[list[int]]
    forward_passes: list[int]
    timed: int  # the first `timed` of `indices` were decoded at batch 1, timed
    seconds: list[float]  # per timed prompt
    block_size: int | None = None
    base_nll: list[float] | None = None  # per generation: the base model's summed NLL of its tokens
    # drafting methods, per prompt: passes by accepted length, committed then per candidate (Generation's)
    acceptance: list[list[list[int]]] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How every row decodes and is timed; a pipeline writes these keys in its evaluate section."""

    max_new_tokens: int = 256
    block_sizes: tuple[int, ...] = (16,)  # every Jacobi row at each n (a row may name its own)
    timing_limit: int | None = None  # time rows (batch 1) on the first N prompts only (None: all)
    batch_size: int = 1  # `full` rows decode the prompts past timing_limit in batches of this size
    include_transformers: bool = True
    prompt_lookup_num_tokens: int = 10  # transformers' prompt-lookup row (0: no such row)

    def __post_init__(self):
        object.__setattr__(self, "block_sizes", tuple(self.block_sizes))  # a YAML list
        if self.timing_limit is not None and self.timing_limit < 1:
            raise ConfigError(f"evaluate.timing_limit must be >= 1 (or null: all), got {self.timing_limit}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or not self.block_sizes or min(self.block_sizes) < 1:
            raise ConfigError("evaluate.max_new_tokens, evaluate.batch_size and every evaluate.block_sizes entry "
                              "must be >= 1")
        if self.prompt_lookup_num_tokens < 0:
            raise ConfigError(f"evaluate.prompt_lookup_num_tokens must be >= 0, got {self.prompt_lookup_num_tokens}")


def row_weights(models: dict[str, LoadedModel], row: Row, merged: dict[str, LoadedModel]) -> LoadedModel:
    """The model a row decodes with: as loaded, or with its adapter merged (a plain method on adapter
    weights: the lossy CLLM; merged once per weights)."""
    if row.weights not in models:
        raise ConfigError(f"evaluation row {row.method} names weights {row.weights!r}; known: {', '.join(models)}")
    loaded = models[row.weights]
    has_adapter = loaded.model.adapter is not None
    # A row runs the method it names: on adapter weights, a method that does not draft is the lossy CLLM
    folded = has_adapter and not get_method(row.method).needs_adapter
    try:
        resolved = resolve_method(row.method, has_adapter, folded,
                                  placeholder_drafter=has_adapter and loaded.model.adapter.placeholders is not None)
    except ConfigError as error:
        raise ConfigError(f"evaluation row {row.method} on weights {row.weights}: {error}") from None
    if resolved.adapter != "merged":
        return loaded
    if row.weights not in merged:  # merged into a copy: the loaded model stays the lossless drafter
        merged[row.weights] = dataclasses.replace(loaded, model=merge(nnx.clone(loaded.model)), adapter=None)
    return merged[row.weights]


def decode_run(name: str, weights: str, loaded: LoadedModel, prompts: list[list[int]], row: Row,
               settings: EvalSettings, block_size: int | None) -> MethodRun:  # fmt: skip
    """One row at one block size: timed batch-1 on the timed prompts, batched on the rest when full."""
    options = row.make_options(max_new_tokens=settings.max_new_tokens, block_size=block_size,
                               eos_id=loaded.tokenizer.eos_token_id)  # fmt: skip
    timed = len(prompts) if settings.timing_limit is None else min(settings.timing_limit, len(prompts))
    decoder = Decoder(loaded.model, row.method, options=options)
    decoder.generate(prompts[:1])  # compile outside the timed run (one length bucket per prompt set)
    rest = []
    with tqdm(total=len(prompts) if row.full else timed, desc=name, unit="prompt", file=sys.stderr,
              mininterval=5, leave=False) as bar:  # fmt: skip
        results = decoder.generate(prompts[:timed], on_batch=lambda batch: bar.update(len(batch)))
        if row.full and timed < len(prompts):
            batched = Decoder(loaded.model, row.method, options=options, batch_size=settings.batch_size)
            rest = batched.generate(prompts[timed:], row_seeds=list(range(timed, len(prompts))),
                                    on_batch=lambda batch: bar.update(len(batch)))  # fmt: skip
    every = results + rest
    return MethodRun(name=name, weights=weights, method=row.method, indices=list(range(len(every))),
                     token_ids=[r.token_ids for r in every],
                     forward_passes=[r.forward_passes for r in every], timed=timed,
                     seconds=[r.seconds for r in results], block_size=block_size,
                     acceptance=None if every[0].acceptance is None else [r.acceptance for r in every])


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
        for index, generation in zip(run.indices, run.token_ids):
            key = (index, tuple(generation))
            if key not in memo:
                memo[key] = generation_nll(base.model, prompts[index], generation)
            nll.append(memo[key])
        out.append(dataclasses.replace(run, base_nll=nll))
    return out


def _transformers(name, loaded: LoadedModel, prompts, settings: EvalSettings, lookup: int | None) -> MethodRun:
    model = load_torch_model(loaded.path)
    eos = loaded.tokenizer.eos_token_id
    timed = prompts if settings.timing_limit is None else prompts[: settings.timing_limit]
    torch_generate(model, timed[:1], 4, eos, lookup)  # warm-up
    results = torch_generate(model, timed, settings.max_new_tokens, eos, lookup)
    # transformers does not report forward passes for generate; TPF is left out (empty) for them
    return MethodRun(name=name, weights="base", method=None, indices=list(range(len(results))),
                     token_ids=[r.token_ids for r in results], forward_passes=[], timed=len(results),
                     seconds=[r.seconds for r in results])


def run_rows(models: dict[str, LoadedModel], rows: list[Row], prompts: list[list[int]], settings: EvalSettings,
             progress: Callable[[str], None] = lambda name: None, keep_dir: Path | None = None) -> list[MethodRun]:
    """Every row at every block size (its first row must be our AR on the base model: the reference).

    keep_dir: each finished run is written there as it ends and read back instead of decoding again,
    so an evaluation killed after hours resumes at the row it was in."""
    if not rows or (rows[0].weights, rows[0].method) != ("base", "ar") or not rows[0].full:
        raise ConfigError("the first evaluation row must be {weights: base, method: ar} (the reference), run full")
    sizes = {row: row.block_sizes or settings.block_sizes for row in rows if row.jacobi}
    every_size = sorted({n for row_sizes in sizes.values() for n in row_sizes})
    several = len(every_size) > 1
    merged: dict[str, LoadedModel] = {}
    plan = [(rows[0], None)]  # the reference first
    for n in every_size:
        plan += [(row, n) for row in rows if row.jacobi and n in sizes[row]]
    plan += [(row, None) for row in rows[1:] if not row.jacobi]
    base = models["base"]
    def decode_job(row: Row, n: int | None):  # the weights (a merge copies them) only when the row runs
        return lambda: decode_run(row.name(n, several), row.weights, row_weights(models, row, merged), prompts, row,
                                  settings, n)

    jobs = [(row.name(n, several), decode_job(row, n)) for row, n in plan]
    if settings.include_transformers:
        lookup = settings.prompt_lookup_num_tokens
        baselines = [("transformers generate (base)", None)]
        baselines += [(f"transformers prompt-lookup {lookup} (base)", lookup)] if lookup else []
        jobs += [(name, functools.partial(_transformers, name, base, prompts, settings, tokens))
                 for name, tokens in baselines]
    runs = []
    for name, job in jobs:
        kept = None if keep_dir is None else keep_dir / (re.sub(r"[^\w.+=-]+", "_", name) + ".json")
        if kept is not None and kept.is_file():
            runs.append(read_kept_run(kept))
            progress(f"{name}: done ({kept})")
            continue
        progress(name)
        runs.append(job())
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.with_suffix(".tmp").write_text(json.dumps(dataclasses.asdict(runs[-1])))
            kept.with_suffix(".tmp").replace(kept)
    progress("base-model NLL of every generation")
    return with_base_nll(runs, base, prompts)


def read_kept_run(path: Path) -> MethodRun:
    values = json.loads(path.read_text())
    if "method" not in values:  # kept before runs recorded their method: a row's name starts with it
        first = values["name"].split(" ")[0]
        values["method"] = first if first in METHODS else None
    return MethodRun(**values)


def verifies_with_base(run: MethodRun) -> bool:
    """Whether the base model verified every token of the run: its text must be the base model's AR text."""
    return run.method is not None and get_method(run.method).verifies_with_base


def _own_ar_agreement(run: MethodRun, own_ar: dict) -> float | None:
    """The fraction of a row's generations equal to its weights' AR text (lossless: the base's), over
    the prompts both decoded; None where no AR row ran on those weights."""
    ar = own_ar.get("base" if verifies_with_base(run) else run.weights)
    pairs = [(a, ar[i]) for i, a in zip(run.indices, run.token_ids) if ar is not None and i in ar]
    return float(np.mean([a == b for a, b in pairs])) if pairs else None


ACCEPTANCE_ROWS = ("committed", "drafter", "lookup")  # the rows of a drafting method's acceptance counts


def acceptance_summary(acceptance: list[list[list[int]]] | None) -> dict | None:
    """Per candidate (what was committed, the drafter alone, lookup alone): the share of passes that
    accepted draft position i (i = 1 .. k: the first i drafts were all right), and the mean accepted
    length (the window's first token included), over every pass after the prefill."""
    if not acceptance:
        return None
    counts = np.sum(np.asarray(acceptance, np.int64), axis=0)  # [1 + C, k + 2]
    lengths = np.arange(counts.shape[1])
    out = {}
    for name, row in zip(ACCEPTANCE_ROWS, counts):
        passes = max(int(row.sum()), 1)
        out[name] = {"by_position": [float(row[i + 1:].sum() / passes) for i in range(1, counts.shape[1] - 1)],
                     "mean_accepted": float((row * lengths).sum() / passes), "passes": int(row.sum())}
    return out


def score(runs: list[MethodRun], correct: Callable[[int, list[int]], bool],
          final_answer: Callable[[list[int]], object] | None = None) -> dict:
    """report.json's per-method figures; the first run (our AR on the base model) is the reference.

    correct(prompt index, tokens): the task's judgement of one generation; final_answer(tokens): what
    "same final answer" compares (GSM8K's number), or None where the task has none."""
    reference = runs[0]
    ref_tokens = dict(zip(reference.indices, reference.token_ids))
    # Each weights' own AR text, where a row "ar (<weights>)" decoded it: an exact method must give it
    # (a lossless row must give the base model's)
    own_ar = {run.weights: dict(zip(run.indices, run.token_ids)) for run in runs if run.method == "ar"}
    ref_nll = dict(zip(reference.indices, reference.base_nll))
    base_speed = sum(len(t) for t in reference.token_ids[: reference.timed]) / sum(reference.seconds)
    table = {}
    for run in runs:
        timed_tokens = sum(len(t) for t in run.token_ids[: run.timed])
        speed = timed_tokens / sum(run.seconds) if sum(run.seconds) > 0 else 0.0
        same = [a == ref_tokens[i] for i, a in zip(run.indices, run.token_ids)]
        nll = sum(run.base_nll) / max(1, sum(len(t) for t in run.token_ids))
        ref = sum(ref_nll[i] for i in run.indices) / max(1, sum(len(ref_tokens[i]) for i in run.indices))
        passes = run.forward_passes
        table[run.name] = {
            "weights": run.weights,
            "method": run.method,
            "verifies_with_base": verifies_with_base(run),
            "prompts": len(run.indices),
            "timed_prompts": run.timed,
            "tpf": sum(len(t) for t in run.token_ids) / sum(passes) if passes else None,
            "tokens_per_second": speed,
            "speedup": speed / base_speed,
            "accuracy": float(np.mean([correct(i, t) for i, t in zip(run.indices, run.token_ids)])),
            "agreement": {
                "final_answer": None if final_answer is None else float(np.mean(
                    [final_answer(a) == final_answer(ref_tokens[i]) for i, a in zip(run.indices, run.token_ids)])),
                "generation": float(np.mean(same)),
                "generations_equal": int(sum(same)),
                "own_ar": _own_ar_agreement(run, own_ar),
            },
            "base_nll_ratio": nll / ref if ref else None,
            "base_nll_per_token": nll,
            "block_size": run.block_size,
            "tpf_per_prompt": [len(t) / p for t, p in zip(run.token_ids, passes)] if passes else [],
            "acceptance": acceptance_summary(run.acceptance),
            "median_seconds_per_prompt": float(np.median(run.seconds)),
        }
    return table
