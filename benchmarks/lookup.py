"""Prompt-lookup guesses against the reference's prefix-sample guesses, on held-out GSM8K in one run.

    python benchmarks/lookup.py --model runs/smollm2_gsm8k_jf/train/export [--prompts 20] \
        [--max-new-tokens 256] [--block-sizes 8,16] [--methods jacobi,jacobi-rolling]

For every method and n: TPF, tokens/s (compilation excluded), speedup over our AR on the same model
in the same run, and whether every output equals AR's token for token (a guess may only change how
soon the fixed point is found). Writes reports/lookup/lookup.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cllm_jax.data.prompts import load_prompts
from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.weights.load import load_model


def run(loaded, prompts, settings: dict) -> tuple[dict, list[list[int]]]:
    results = Decoder(loaded.model, **settings).generate(prompts)
    return summarize(results), [r.token_ids for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a CLLM (training run or export); default: the base SmolLM2")
    parser.add_argument("--prompts", type=int, default=20, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--block-sizes", default="8,16")
    parser.add_argument("--methods", default="jacobi,jacobi-rolling")
    parser.add_argument("--out", default="reports/lookup/lookup.json")
    args = parser.parse_args()

    loaded = load_model(args.model)
    prompts = [loaded.tokenizer.chat_ids(e.prompt) for e in load_prompts("gsm8k-eval", limit=args.prompts)]
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=loaded.tokenizer.eos_token_id)
    rows = []
    ar, reference = run(loaded, prompts, dict(method="ar", **common))
    rows.append({"method": "ar", "n": None, "init": None, "tpf": 1.0, "tokens_per_second": ar["tokens_per_second"],
                 "speedup": 1.0, "equals_ar": True})  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    for method in args.methods.split(","):
        for n in (int(v) for v in args.block_sizes.split(",")):
            for init in ("prefix-sample", "lookup"):
                summary, tokens = run(loaded, prompts, dict(method=method, block_size=n, init=init, **common))
                rows.append({
                    "method": method, "n": n, "init": init, "tpf": summary["tokens_per_forward"],
                    "tokens_per_second": summary["tokens_per_second"],
                    "speedup": summary["tokens_per_second"] / ar["tokens_per_second"], "equals_ar": tokens == reference,
                })  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"model": str(loaded.path), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "machine": describe_machine(), "load_after": os.getloadavg(), "rows": rows}  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
