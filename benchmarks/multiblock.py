"""Multiblock Jacobi and rejection recycling on SmolLM2: TPF against rolling Jacobi (every output
checked against AR), and the CPU cost of one pass in the layouts recycling could verify candidates in.

    python benchmarks/multiblock.py [--prompts 4] [--max-new-tokens 64] [--block-size 16]
    python benchmarks/multiblock.py --layouts [--repeats 5]

Layouts (n = 16, P candidates of n tokens): `rows` runs the window in 1 + P batch rows (what
cllm_jax.decode.multiblock does); `segment` runs one row of window + P * n tokens under a mask (a
tree / extra-segment layout). Only its cost is measured: with the KV cache's slot == position rule,
candidates at the same positions as the window would overwrite each other's entries, so a correct
segment layout needs cache slots apart from RoPE positions in the model's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.evaluate.prompts import gsm8k_benchmark_prompts
from cllm_jax.model.kv_cache import KVCache, causal_mask
from cllm_jax.weights.load import load_model


def compare_tpf(loaded, args) -> None:
    eos = loaded.tokenizer.eos_token_id
    prompts = gsm8k_benchmark_prompts(loaded.tokenizer, args.prompts)
    n = args.block_size
    runs = [
        ("ar", dict(method="ar")),
        ("rolling", dict(method="jacobi-rolling")),
        ("rolling + recycling P=4", dict(method="jacobi-rolling", recycle=4)),
        ("multiblock K=2", dict(method="jacobi-multiblock", blocks=2)),
        ("multiblock K=2 + recycling P=4", dict(method="jacobi-multiblock", blocks=2, recycle=4)),
    ]
    reference = None
    for name, extra in runs:
        settings = dict(max_new_tokens=args.max_new_tokens, block_size=n, eos_id=eos, **extra)
        decoder = Decoder(loaded.model, **settings)
        decoder.generate(prompts[:1])  # compile
        results = decoder.generate(prompts)
        tokens = [r.token_ids for r in results]
        reference = reference or tokens
        s = summarize(results)
        print(json.dumps({"method": name, "n": n, "tpf": round(s["tokens_per_forward"], 3), "tokens": s["tokens"],
                          "forward_passes": s["forward_passes"], "tokens_per_second": round(s["tokens_per_second"], 1),
                          "equals_ar": tokens == reference}), flush=True)  # fmt: skip


def pass_cost(loaded, args) -> None:
    model, config = loaded.model, loaded.model.config
    n, p, length, frontier = 16, 4, 512, 200

    @jax.jit
    def step(model, tokens, positions, cache, mask):
        hidden, cache = model(tokens, positions, cache, mask)
        return jnp.argmax(model.logits(hidden), -1), cache

    def timed(rows, width, segment=0):
        cache = KVCache.zeros(config, rows, length)
        base = frontier + jnp.arange(width, dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.concatenate([base] + [base[:n]] * segment), (rows, width + segment * n))
        # Any [B, T, S] mask costs the same; a real segment mask would hide the other candidates' slots.
        mask = causal_mask(positions, length)
        tokens = jnp.ones(positions.shape, jnp.int32)
        best = float("inf")
        for i in range(args.repeats + 1):
            start = time.perf_counter()
            out, cache = jax.block_until_ready(step(model, tokens, positions, cache, mask))
            if i:  # the first call compiles
                best = min(best, time.perf_counter() - start)
        return best * 1000

    print(json.dumps({"load_before": os.getloadavg()}), flush=True)
    ar = timed(1, 1)
    for blocks in (1, 2):
        width = blocks * n
        row = {"window": width, "ar_step_ms": round(ar, 1), "main_ms": round(timed(1, width), 1),
               f"rows_1+{p}_ms": round(timed(1 + p, width), 1),
               f"segment_+{p}x{n}_ms": round(timed(1, width, segment=p), 1)}  # fmt: skip
        print(json.dumps(row), flush=True)
    print(json.dumps({"load_after": os.getloadavg()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--layouts", action="store_true", help="time one pass per verification layout instead")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    loaded = load_model(None)
    (pass_cost if args.layouts else compare_tpf)(loaded, args)


if __name__ == "__main__":
    main()
