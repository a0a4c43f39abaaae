"""Prompt-lookup guesses against the reference's prefix-sample guesses, on held-out GSM8K in one run.

    python benchmarks/studies/lookup.py --model runs/smollm2_gsm8k_jf/train/export [--prompts 20] \
        [--max-new-tokens 256] [--block-sizes 8,16] [--methods jacobi,jacobi-rolling]

The first N held-out GSM8K problems (the evaluation's, of any length), greedy, batch 1. For every
method and n: TPF, tokens/s (the decoder's timing of each generation, compilation excluded; one run
each), speedup over our AR on the same model in the same run, and whether every output equals AR's
token for token (a guess may only change how soon the fixed point is found). Writes
reports/lookup/lookup.json (or --out).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from cllm_jax.data.sources import load_prompts  # noqa: E402
from cllm_jax.decode.engine import Decoder, summarize  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402


def run(loaded, prompts, method: str, **options) -> tuple[dict, list[list[int]]]:
    results = Decoder(loaded.model, method, **options).generate(prompts)
    return summarize(results), [r.token_ids for r in results]


def main() -> None:
    parser = harness.parser(__doc__, out="reports/lookup/lookup.json")
    parser.add_argument("--model", help="a CLLM (training run or export); default: the base SmolLM2")
    parser.add_argument("--prompts", type=int, default=20, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--block-sizes", default="8,16")
    parser.add_argument("--methods", default="jacobi,jacobi-rolling")
    args = parser.parse_args()

    loaded = load_model(args.model)
    prompts = [loaded.tokenizer.chat_ids(e.prompt) for e in load_prompts("gsm8k-eval", limit=args.prompts)]
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=loaded.tokenizer.eos_token_id)
    ar, reference = run(loaded, prompts, "ar", **common)
    rows = [{"method": "ar", "n": None, "init": None, "tpf": 1.0, "tokens_per_second": ar["tokens_per_second"],
             "speedup": 1.0, "equals_ar": True}]  # fmt: skip
    for method in args.methods.split(","):
        for n in (int(v) for v in args.block_sizes.split(",")):
            for init in ("prefix-sample", "lookup"):
                summary, tokens = run(loaded, prompts, method, block_size=n, init=init, **common)
                rows.append({
                    "method": method, "n": n, "init": init, "tpf": summary["tokens_per_forward"],
                    "tokens_per_second": summary["tokens_per_second"],
                    "speedup": summary["tokens_per_second"] / ar["tokens_per_second"], "equals_ar": tokens == reference,
                })  # fmt: skip
                print(f"{method} n={n} {init}: TPF {rows[-1]['tpf']:.2f}", flush=True)
    print(harness.table(rows, [("method", "method", ""), ("n", "n", ""), ("init", "init", ""), ("TPF", "tpf", ".2f"),
                               ("tokens/s", "tokens_per_second", ".1f"), ("speedup over AR", "speedup", ".2f"),
                               ("equals AR", "equals_ar", "")]))
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
