"""Jacobi decoding on the untrained SmolLM2: AR against fixed-block and rolling Jacobi, n = 8, 16, 32.

This is the honest baseline a CLLM is measured against: on an ordinary model expect about 1.0-1.3
tokens per forward pass. GSM8K questions (chat template, one length bucket), batch 1, greedy. Each
prompt is decoded `--repeats` times and its best time kept (the decoder times each generation,
compilation excluded; a shared machine has passing slowdowns). Per method: TPF, tokens/s, the
speedup over AR and whether every output equals AR's. Prints a table, saves it as JSON and, beside
it, as a plot (.png).

    python benchmarks/speed/jacobi.py [--prompts 5] [--max-new-tokens 128] [--block-sizes 8,16,32] \
        [--repeats 2] [--out reports/jacobi_baseline/jacobi_baseline.json]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from cllm_jax.decode.engine import Decoder, summarize  # noqa: E402
from cllm_jax.evaluate.machine import describe_machine  # noqa: E402
from cllm_jax.evaluate.plots import plot_method_bars  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402


def main() -> None:
    parser = harness.parser(__doc__, out="reports/jacobi_baseline/jacobi_baseline.json")
    parser.set_defaults(repeats=2)
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--block-sizes", default="8,16,32")
    args = parser.parse_args()

    loaded = load_model(None)
    eos = loaded.tokenizer.eos_token_id
    prompts = harness.gsm8k_prompts(loaded.tokenizer, args.prompts)
    runs = [("ar", None)] + [(m, int(n)) for m in ("jacobi", "jacobi-rolling") for n in args.block_sizes.split(",")]
    rows, reference = [], None
    for method, n in runs:
        sizes = {} if n is None else {"block_size": n}
        decoder = Decoder(loaded.model, method, max_new_tokens=args.max_new_tokens, eos_id=eos, **sizes)
        decoder.generate(prompts[:1])  # compile outside the timed runs
        repeats = [decoder.generate(prompts) for _ in range(args.repeats)]
        results = [min(runs, key=lambda r: r.seconds) for runs in zip(*repeats)]
        summary = summarize(results)
        if reference is None:
            reference = (summary, [r.token_ids for r in results])
        rows.append({
            "method": method, "block_size": n,
            "tokens_per_forward": summary["tokens_per_forward"],
            "tokens_per_second": summary["tokens_per_second"],
            "median_tokens_per_second": statistics.median(len(r.token_ids) / r.seconds for r in results),
            "iterations_per_block": summary["iterations_per_block"],
            "fast_forwarded": summary["fast_forwarded"], "stationary": summary["stationary"],
            "speedup": summary["tokens_per_second"] / reference[0]["tokens_per_second"],
            "same_output_as_ar": [r.token_ids for r in results] == reference[1],
        })  # fmt: skip
        print(f"{method if n is None else f'{method} n={n}'}: {rows[-1]['tokens_per_second']:.1f} tok/s", flush=True)
    print(harness.table(rows, [("method", "method", ""), ("n", "block_size", ""), ("TPF", "tokens_per_forward", ".2f"),
                               ("tokens/s", "tokens_per_second", ".1f"),
                               ("median tok/s", "median_tokens_per_second", ".1f"),
                               ("speedup over AR", "speedup", ".2f"), ("same output as AR", "same_output_as_ar", "")]))
    out = harness.write(args.out, rows, args)
    labels = [r["method"] if r["block_size"] is None else f"{r['method']}\nn={r['block_size']}" for r in rows]
    plot_method_bars(labels, {"speedup over AR": [r["speedup"] for r in rows],
                              "tokens per forward": [r["tokens_per_forward"] for r in rows]},
                     out.with_suffix(".png"), title=f"Untrained SmolLM2-135M, GSM8K, {describe_machine()['cpu']}")
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
