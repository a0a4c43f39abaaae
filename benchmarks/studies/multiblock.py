"""Multiblock Jacobi and rejection recycling on SmolLM2: TPF against rolling Jacobi (every output
checked against AR), and the CPU cost of one pass in the layouts recycling could verify candidates in.

    python benchmarks/studies/multiblock.py [--prompts 4] [--max-new-tokens 64] [--block-size 16]
    python benchmarks/studies/multiblock.py --layouts [--repeats 5]

The first mode decodes GSM8K questions (chat template, one length bucket), greedy, batch 1, one run
per method (tokens/s from the decoder's timing, compilation excluded) and writes
reports/multiblock/multiblock.json; the second writes reports/multiblock/layouts.json (or --out).

Layouts (n = 16, P candidates of n tokens): `rows` runs the window in 1 + P batch rows (what
rejection recycling does: cllm_jax/decode/window.py); `segment` runs one row of window + P * n
tokens under a mask (a tree / extra-segment layout). Only its cost is measured (best of `--repeats`
passes after a compiling one): with the KV cache's slot == position rule, candidates at the same
positions as the window would overwrite each other's entries, so a correct segment layout needs
cache slots apart from RoPE positions in the model's forward.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cllm_jax.decode.engine import Decoder, summarize  # noqa: E402
from cllm_jax.model.kv_cache import KVCache, causal_mask  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402

OUT = "reports/multiblock/multiblock.json"
LAYOUTS_OUT = "reports/multiblock/layouts.json"


def compare_tpf(loaded, args) -> list[dict]:
    eos = loaded.tokenizer.eos_token_id
    prompts = harness.gsm8k_prompts(loaded.tokenizer, args.prompts)
    n = args.block_size
    runs = [
        ("ar", "ar", {}),
        ("rolling", "jacobi-rolling", {}),
        ("rolling + recycling P=4", "jacobi-rolling", dict(recycle=4)),
        ("multiblock K=2", "jacobi-multiblock", dict(blocks=2)),
        ("multiblock K=2 + recycling P=4", "jacobi-multiblock", dict(blocks=2, recycle=4)),
    ]
    rows, reference = [], None
    for name, method, extra in runs:
        block = {} if method == "ar" else {"block_size": n}
        decoder = Decoder(loaded.model, method, max_new_tokens=args.max_new_tokens, eos_id=eos, **block, **extra)
        decoder.generate(prompts[:1])  # compile
        results = decoder.generate(prompts)
        tokens = [r.token_ids for r in results]
        reference = reference or tokens
        s = summarize(results)
        rows.append({"method": name, "n": n, "tpf": s["tokens_per_forward"], "tokens": s["tokens"],
                     "forward_passes": s["forward_passes"], "tokens_per_second": s["tokens_per_second"],
                     "equals_ar": tokens == reference})  # fmt: skip
        print(f"{name}: TPF {rows[-1]['tpf']:.3f}", flush=True)
    for row in rows:
        row["tpf_vs_rolling"] = row["tpf"] / rows[1]["tpf"]
    print(harness.table(rows, [("method", "method", ""), ("n", "n", "d"), ("TPF", "tpf", ".3f"),
                               ("TPF x rolling", "tpf_vs_rolling", ".2f"), ("tokens", "tokens", "d"),
                               ("passes", "forward_passes", "d"), ("tokens/s", "tokens_per_second", ".1f"),
                               ("equals AR", "equals_ar", "")]))
    return rows


def pass_cost(loaded, args) -> list[dict]:
    model, config = loaded.model, loaded.model.config
    n, p, length, frontier = 16, 4, 512, 200

    @jax.jit
    def step(model, tokens, positions, cache, mask):
        hidden, cache = model(tokens, positions, cache, mask)
        return jnp.argmax(model.logits(hidden), -1), cache

    def timed(rows, width, segment=0) -> float:
        cache = KVCache.zeros(config, rows, length)
        base = frontier + jnp.arange(width, dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.concatenate([base] + [base[:n]] * segment), (rows, width + segment * n))
        # Any [B, T, S] mask costs the same; a real segment mask would hide the other candidates' slots.
        mask = causal_mask(positions, length)
        tokens = jnp.ones(positions.shape, jnp.int32)
        timing = harness.best_of(lambda: jax.block_until_ready(step(model, tokens, positions, cache, mask)),
                                 args.repeats)  # the untimed first call compiles
        return 1e3 * timing["best"]

    ar = timed(1, 1)
    rows = []
    for blocks in (1, 2):
        width = blocks * n
        row = {"window": width, "ar_step_ms": ar, "main_ms": timed(1, width), "rows_ms": timed(1 + p, width),
               "segment_ms": timed(1, width, segment=p)}
        row |= {"rows_x_main": row["rows_ms"] / row["main_ms"], "segment_x_main": row["segment_ms"] / row["main_ms"]}
        rows.append(row)
    print(harness.table(rows, [("window", "window", "d"), ("AR step ms", "ar_step_ms", ".1f"),
                               ("window ms", "main_ms", ".1f"), (f"rows 1+{p} ms", "rows_ms", ".1f"),
                               ("rows x window", "rows_x_main", ".2f"), (f"segment +{p}x{n} ms", "segment_ms", ".1f"),
                               ("segment x window", "segment_x_main", ".2f")]))
    return rows


def main() -> None:
    parser = harness.parser(__doc__, out=OUT)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layouts", action="store_true",
                        help=f"time one pass per verification layout instead (default --out {LAYOUTS_OUT})")
    parser.set_defaults(repeats=5)
    args = parser.parse_args()
    if args.layouts and args.out == OUT:
        args.out = LAYOUTS_OUT
    loaded = load_model(None)
    rows = (pass_cost if args.layouts else compare_tpf)(loaded, args)
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
