"""Jacobi decoding on the untrained SmolLM2: AR against fixed-block and rolling Jacobi, n = 8, 16, 32.

This is the honest baseline a CLLM is measured against: on an ordinary model expect about 1.0-1.3
tokens per forward pass. Each prompt is timed `--repeats` times and its best time kept (passing
slowdowns on a shared machine). Prints a table, saves it as JSON and as a plot.

    python benchmarks/jacobi.py [--prompts 5] [--out-dir reports/jacobi_baseline]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.evaluate.plots import plot_method_bars
from cllm_jax.evaluate.prompts import gsm8k_benchmark_prompts
from cllm_jax.weights.load import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-sizes", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default="reports/jacobi_baseline")
    args = parser.parse_args()

    loaded = load_model(None)
    eos = loaded.tokenizer.eos_token_id
    prompts = gsm8k_benchmark_prompts(loaded.tokenizer, args.prompts)
    runs = [("ar", 1)] + [(m, int(n)) for m in ("jacobi", "jacobi-rolling") for n in args.block_sizes.split(",")]
    rows, reference = [], None
    for method, n in runs:
        settings = dict(method=method, max_new_tokens=args.max_new_tokens, block_size=n, eos_id=eos)
        decoder = Decoder(loaded.model, **settings)
        decoder.generate(prompts[:1])  # compile outside the timed run
        repeats = [decoder.generate(prompts) for _ in range(args.repeats)]
        results = [min(runs, key=lambda r: r.seconds) for runs in zip(*repeats)]
        summary = summarize(results)
        if reference is None:
            reference = (summary, [r.token_ids for r in results])
        exact = [r.token_ids for r in results] == reference[1]
        rows.append({
            "method": method, "block_size": n if method != "ar" else None,
            "tokens_per_forward": summary["tokens_per_forward"],
            "tokens_per_second": summary["tokens_per_second"],
            "median_tokens_per_second": float(np.median([len(r.token_ids) / r.seconds for r in results])),
            "iterations_per_block": summary["iterations_per_block"],
            "fast_forwarded": summary["fast_forwarded"], "stationary": summary["stationary"],
            "speedup": summary["tokens_per_second"] / reference[0]["tokens_per_second"],
            "same_output_as_ar": exact,
        })  # fmt: skip
        r = rows[-1]
        label = method if method == "ar" else f"{method} n={n}"
        print(f"{label:<22} TPF {r['tokens_per_forward']:5.2f}  {r['tokens_per_second']:6.1f} tok/s  "
              f"speedup {r['speedup']:4.2f}x  exact {exact}", flush=True)  # fmt: skip
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": describe_machine(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows}
    (out / "jacobi_baseline.json").write_text(json.dumps(report, indent=2) + "\n")
    labels = [r["method"] if r["block_size"] is None else f"{r['method']}\nn={r['block_size']}" for r in rows]
    plot_method_bars(labels, {"speedup over AR": [r["speedup"] for r in rows],
                              "tokens per forward": [r["tokens_per_forward"] for r in rows]},
                     out / "jacobi_baseline.png", title=f"Untrained SmolLM2-135M, GSM8K, {report['machine']['cpu']}")  # fmt: skip
    print(f"saved {out / 'jacobi_baseline.json'} and {out / 'jacobi_baseline.png'}")


if __name__ == "__main__":
    main()
