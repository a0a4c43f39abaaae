"""Greedy autoregressive tokens/s: our jitted JAX decoding against transformers' torch generate.

Same SmolLM2-135M-Instruct weights, same GSM8K questions (chat template, one length bucket), 128 new
tokens, batch 1, same machine, one run. Each prompt is decoded `--repeats` times by both, alternating,
and its best time kept (this shared machine has passing slowdowns): each generation is timed whole,
ours by the decoder (compilation excluded), theirs around `generate`. Figures are over all prompts,
and the median of per-prompt tokens/s. Prints both, the ratio, and whether the outputs agree token
for token.

    python benchmarks/speed/ar_vs_transformers.py [--prompts 8] [--max-new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import torch  # noqa: E402

from cllm_jax.decode.engine import Decoder  # noqa: E402
from cllm_jax.evaluate.baselines import load_torch_model, torch_generate  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402


def throughput(results) -> dict:
    """Tokens/s over all prompts (all tokens over all time) and the median of per-prompt tokens/s."""
    tokens = sum(len(r.token_ids) for r in results)
    seconds = sum(r.seconds for r in results)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
            "median_tokens_per_second": statistics.median(len(r.token_ids) / r.seconds for r in results)}


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench_ar.json")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    loaded = load_model(None)
    eos = loaded.tokenizer.eos_token_id
    prompts = harness.gsm8k_prompts(loaded.tokenizer, args.prompts)

    decoder = Decoder(loaded.model, "ar", max_new_tokens=args.max_new_tokens, eos_id=eos)
    compile_seconds = decoder.generate(prompts[:1])[0].compile_seconds  # warm-up: compile once
    torch.set_num_threads(os.cpu_count())
    reference = load_torch_model(loaded.path)
    torch_generate(reference, prompts[:1], 8, eos)  # warm-up

    ours_runs, theirs_runs = [], []
    for _ in range(args.repeats):  # alternating, so that a slow spell of the machine hits both
        ours_runs.append(decoder.generate(prompts))
        theirs_runs.append(torch_generate(reference, prompts, args.max_new_tokens, eos))
    ours = [min(runs, key=lambda r: r.seconds) for runs in zip(*ours_runs)]
    theirs = [min(runs, key=lambda r: r.seconds) for runs in zip(*theirs_runs)]
    agree = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs)) / len(ours)

    rows = [{"method": "cllm_jax AR", **throughput(ours), "compile_seconds": compile_seconds,
             "identical_outputs": agree},
            {"method": "transformers generate", **throughput(theirs), "torch_threads": torch.get_num_threads()}]
    for row in rows:
        row["ratio"] = row["tokens_per_second"] / rows[1]["tokens_per_second"]
        row["median_ratio"] = row["median_tokens_per_second"] / rows[1]["median_tokens_per_second"]
    print(harness.table(rows, [("method", "method", ""), ("tokens", "tokens", "d"),
                               ("tokens/s", "tokens_per_second", ".1f"),
                               ("median tok/s", "median_tokens_per_second", ".1f"),
                               ("x transformers", "ratio", ".2f"), ("median x", "median_ratio", ".2f")]))
    print(f"identical outputs: {agree:.0%}; our compilation {compile_seconds:.1f} s (excluded); "
          f"torch threads {torch.get_num_threads()}")
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
