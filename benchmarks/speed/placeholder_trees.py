"""What a pass of each placeholder-drafter layout costs, in AR steps, and the TPF it would need.

A lossless-placeholder pass feeds one row of T tokens (cllm_jax/decode/placeholder.py: the window,
the lookup candidate, the placeholder groups); an AR step feeds one. A layout beats AR in wall clock
only where its TPF exceeds its pass cost in AR steps (the break-even TPF printed here). On a CPU a
pass is not one weight read: its matmuls have T rows, and XLA:CPU's small-row GEMMs cost far more
than the matrix-vector product of an AR step, so the cost grows with T long before the arithmetic
would bound it. Every row decodes the same GSM8K prompts with the model's shipped drafter, in
turns, the best run of each kept; ms per pass = wall time / forward passes (prefill included).

    python benchmarks/speed/placeholder_trees.py [--model qwen2.5-coder-0.5b] [--prompts 2] [--repeats 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

from cllm_jax.decode.engine import Decoder  # noqa: E402
from cllm_jax.weights.drafters import drafter_for  # noqa: E402
from cllm_jax.weights.load import load_model, resolve_adapter  # noqa: E402
from cllm_jax.weights.peft import load_adapter  # noqa: E402

# (drafts k, placeholder groups, lookup candidate): from the smallest row to the paper's quadratic one
LAYOUTS = ((3, "last", 1), (2, "every", 1), (3, "every", 0), (3, "main", 1), (4, "every", 0), (4, "every", 1))


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench/placeholder_trees.json")
    parser.add_argument("--model", help="a built-in model with a shipped drafter (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    shipped = drafter_for(args.model)
    if shipped is None:
        parser.error(f"no drafter ships for {args.model}: choose a built-in model that has one")
    base, drafting = load_model(args.model), load_model(args.model)
    load_adapter(drafting.model, resolve_adapter(shipped))
    prompts = harness.gsm8k_prompts(base.tokenizer, args.prompts)
    common = dict(max_new_tokens=args.max_new_tokens, eos_id=base.tokenizer.eos_token_id)
    decoders = {("ar", None, None): Decoder(base.model, "ar", **common)}
    for k, groups, lookup in LAYOUTS:
        decoders[(k, groups, lookup)] = Decoder(drafting.model, "lossless-placeholder", drafts=k, groups=groups,
                                                lookup=lookup, **common)
    for decoder in decoders.values():
        decoder.generate(prompts[:1])  # compile
    runs = {key: [] for key in decoders}
    for _ in range(args.repeats):
        for key, decoder in decoders.items():
            runs[key].append(decoder.generate(prompts))
    ar_tokens = [r.token_ids for r in min(runs[("ar", None, None)], key=lambda rs: sum(r.seconds for r in rs))]
    rows = []
    for (k, groups, lookup), results in runs.items():
        best = min(results, key=lambda rs: sum(r.seconds for r in rs))
        seconds, passes = sum(r.seconds for r in best), sum(r.forward_passes for r in best)
        tokens = sum(len(r.token_ids) for r in best)
        layout = "AR step" if k == "ar" else f"k = {k}, groups {groups}" + (" + lookup" if lookup else "")
        width = 1 if k == "ar" else decoders[(k, groups, lookup)].options.pass_tokens
        rows.append({"layout": layout, "tokens": width, "ms": 1e3 * seconds / passes, "tpf": tokens / passes,
                     "tokens_per_s": tokens / seconds, "same": sum(r.token_ids == t for r, t in zip(best, ar_tokens))})
    step = rows[0]["ms"]
    for row in rows:
        row["break_even_tpf"] = row["ms"] / step
        row["vs_ar"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(harness.table(rows, [("layout", "layout", ""), ("tokens per pass", "tokens", "d"),
                               ("ms per pass", "ms", ".1f"), ("break-even TPF (AR steps)", "break_even_tpf", ".2f"),
                               ("TPF", "tpf", ".2f"), ("tokens/s", "tokens_per_s", ".1f"), ("vs AR", "vs_ar", ".2f"),
                               ("= AR text", "same", "d")]))
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
