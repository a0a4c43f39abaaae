"""What one decoding pass costs in each layout, against one autoregressive step, on this machine.

For each window n: one AR step (1 token), a plain Jacobi pass (n tokens: the model drafts for
itself), and the two lossless layouts (cllm_jax/decode/drafting.py): `rows` (a base row and an
adapter row of n tokens each) and `gated` (one row of 2n tokens, the adapter on the draft copy).
A pass's cost in AR steps is the TPF a method needs to break even against AR; how far TPF exceeds it
is the speedup. The adapter's weights are random (its cost, not its drafts, is measured), rank 16 on
every projection as in the recipe; the context holds a 128-token prompt and 128 generated tokens.

    python benchmarks/speed/pass_cost.py [--model NAME] [--sizes 8,16,32] [--repeats 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cllm_jax.decode import drafting  # noqa: E402
from cllm_jax.decode.options import Sampling  # noqa: E402
from cllm_jax.decode.prefill import cache_length_for  # noqa: E402
from cllm_jax.model.adapter import AdapterConfig, attach  # noqa: E402
from cllm_jax.model.kv_cache import KVCache  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402

PROMPT, GENERATED = 128, 128


def pass_time(model, layout: str, width: int, repeats: int, passes: int = 16) -> dict:
    """Seconds per pass: `passes` passes in one jitted loop carrying the cache, as in decoding (no
    dispatch or copy of the cache between passes), each pass feeding its predictions to the next."""
    slots = cache_length_for(PROMPT, 2 * GENERATED, width)
    cache = KVCache.zeros(model.config, *drafting.cache_shape(layout, 1, slots, width))
    positions = PROMPT + GENERATED + jnp.arange(width, dtype=jnp.int32)[None]

    @jax.jit
    def run(model, cache):
        def one(_, carry):
            window, cache = carry
            verified, drafted, cache = drafting.predict(model, layout, window, positions, jnp.zeros((1,), jnp.int32),
                                                        cache, Sampling())
            return jnp.maximum(verified, drafted), cache

        return jax.lax.fori_loop(0, passes, one, (jnp.full((1, width), 3, jnp.int32), cache))

    timing = harness.best_of(lambda: jax.block_until_ready(run(model, cache)), repeats)
    return {k: (v / passes if k != "runs" else [t / passes for t in v]) for k, v in timing.items()}


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench/pass_cost.json")
    parser.add_argument("--model", help="any --model of decode.py (default: the built-in SmolLM2)")
    parser.add_argument("--sizes", default="8,16,32")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    model = load_model(args.model).model
    attach(model, AdapterConfig(rank=args.rank))
    ar = pass_time(model, "self", 1, args.repeats)
    rows = [{"n": 1, "layout": "AR step", "ms": 1e3 * ar["best"], "median_ms": 1e3 * ar["median"], "ar_steps": 1.0}]
    for n in (int(s) for s in args.sizes.split(",")):
        plain = None
        for layout, label in (("self", "plain Jacobi pass"), ("rows", "lossless rows"), ("gated", "lossless gated")):
            t = pass_time(model, layout, n, args.repeats)
            plain = plain or t["best"]
            rows.append({"n": n, "layout": label, "ms": 1e3 * t["best"], "median_ms": 1e3 * t["median"],
                         "ar_steps": t["best"] / ar["best"], "plain_passes": t["best"] / plain})
    print(harness.table(rows, [("n", "n", ""), ("layout", "layout", ""), ("ms (best)", "ms", ".1f"),
                               ("ms (median)", "median_ms", ".1f"), ("AR steps = break-even TPF", "ar_steps", ".2f"),
                               ("plain passes", "plain_passes", ".2f")]))
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
