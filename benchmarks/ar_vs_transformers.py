"""Greedy autoregressive tokens/s: our jitted JAX decoding against transformers' torch generate.

Same SmolLM2-135M-Instruct weights, same GSM8K questions (chat template), 128 new tokens, batch 1,
same machine, one run. Each prompt is timed `--repeats` times for both, alternating, and its best
time is kept (this shared machine has passing slowdowns); figures are over all prompts, and the
median of per-prompt tokens/s. Prints both, the ratio, and whether the outputs agree token for token.

    python benchmarks/ar_vs_transformers.py [--prompts 8] [--out reports/bench_ar.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from cllm_jax.decode.engine import Decoder
from cllm_jax.evaluate.baselines import load_torch_model, throughput, torch_generate
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.evaluate.prompts import gsm8k_benchmark_prompts
from cllm_jax.weights.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="reports/bench_ar.json")
    args = parser.parse_args()

    loaded = load_model(None)
    eos = loaded.tokenizer.eos_token_id
    prompts = gsm8k_benchmark_prompts(loaded.tokenizer, args.prompts)

    decoder = Decoder(loaded.model, **dict(method="ar", max_new_tokens=args.max_new_tokens, eos_id=eos))
    compile_seconds = decoder.generate(prompts[:1])[0].compile_seconds  # warm-up: compile once
    torch.set_num_threads(os.cpu_count())
    reference = load_torch_model(loaded.path)
    torch_generate(reference, prompts[:1], 8, eos)  # warm-up

    ours_runs, theirs_runs = [], []
    for _ in range(args.repeats):
        ours_runs.append(decoder.generate(prompts))
        theirs_runs.append(torch_generate(reference, prompts, args.max_new_tokens, eos))
    ours = [min(runs, key=lambda r: r.seconds) for runs in zip(*ours_runs)]
    theirs = [min(runs, key=lambda r: r.seconds) for runs in zip(*theirs_runs)]

    ours_stats = throughput([len(r.token_ids) for r in ours], [r.seconds for r in ours])
    theirs_stats = throughput([len(r.token_ids) for r in theirs], [r.seconds for r in theirs])
    agree = float(np.mean([a.token_ids == b.token_ids for a, b in zip(ours, theirs)]))
    report = {
        "machine": describe_machine(),
        "model": str(loaded.path),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "cllm_jax_ar": ours_stats | {"compile_seconds": compile_seconds},
        "transformers_generate": theirs_stats | {"torch_threads": torch.get_num_threads()},
        "ratio": ours_stats["tokens_per_second"] / theirs_stats["tokens_per_second"],
        "median_ratio": ours_stats["median_tokens_per_second"] / theirs_stats["median_tokens_per_second"],
        "identical_outputs": agree,
    }
    print(f"{'method':<24}{'tokens':>8}{'tokens/s':>10}{'median tok/s':>14}")
    for name in ("cllm_jax_ar", "transformers_generate"):
        s = report[name]
        print(f"{name:<24}{s['tokens']:>8}{s['tokens_per_second']:>10.1f}{s['median_tokens_per_second']:>14.1f}")
    print(f"ratio ours/transformers: {report['ratio']:.2f}x (median {report['median_ratio']:.2f}x); "
          f"identical outputs: {agree:.0%}; compile {compile_seconds:.1f} s; {report['machine']['cpu']}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
