"""Decoding speed under each layer loop (scan, per_layer) beside transformers' greedy `generate`.

Where a CPU decoding step's time goes: the step reads every weight once for its matmuls, and the scan
loop also slices each layer's weights out of the stacked buffer first, a second read of every weight.
This measures both loops on the same prompts in one run (AR, rolling Jacobi with lookup guesses, and
the model's shipped placeholder drafter with its lookup candidate), with compile time apart, and
transformers' greedy `generate` as the reference a user would otherwise run. Runs alternate between
the configurations, so a slow spell of a shared machine hits all of them; each prompt's best time is
kept.

    python benchmarks/speed/layer_loop.py [--model qwen2.5-coder-0.5b] [--prompts 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import torch  # noqa: E402

from cllm_jax.decode.engine import Decoder  # noqa: E402
from cllm_jax.evaluate.baselines import load_torch_model, torch_generate  # noqa: E402
from cllm_jax.weights.drafters import drafter_for  # noqa: E402
from cllm_jax.weights.load import load_model, resolve_adapter  # noqa: E402
from cllm_jax.weights.peft import load_adapter  # noqa: E402

LOOPS = ("scan", "per_layer")


def tokens_per_second(results) -> float:
    return sum(len(r.token_ids) for r in results) / sum(r.seconds for r in results)


def main() -> None:
    parser = harness.parser(__doc__, out="reports/bench/layer_loop.json")
    parser.add_argument("--model", help="a built-in model (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()

    decoders, prompts, eos, path = {}, None, None, None
    shipped = drafter_for(args.model)
    for loop in LOOPS:
        loaded = load_model(args.model, layer_loop=loop)
        eos, path = loaded.tokenizer.eos_token_id, loaded.path
        prompts = prompts or harness.gsm8k_prompts(loaded.tokenizer, args.prompts)
        common = dict(max_new_tokens=args.max_new_tokens, eos_id=eos)
        decoders[(loop, "ar")] = Decoder(loaded.model, "ar", **common)
        decoders[(loop, "rolling + lookup, n = 8")] = Decoder(loaded.model, "jacobi-rolling", init="lookup",
                                                               block_size=8, **common)
        if shipped:  # a second copy of the weights: the drafter changes the model's pytree
            drafting = load_model(args.model, layer_loop=loop)
            load_adapter(drafting.model, resolve_adapter(shipped))
            decoders[(loop, f"{shipped} k = 3 + lookup")] = Decoder(
                drafting.model, "lossless-placeholder", drafts=3, lookup=1, groups="main", **common)
    compile_seconds = {key: d.generate(prompts[:1])[0].compile_seconds for key, d in decoders.items()}
    torch.set_num_threads(os.cpu_count())
    reference = load_torch_model(path)
    torch_generate(reference, prompts[:1], 8, eos)  # warm-up

    runs = {key: [] for key in [*decoders, "transformers"]}
    for _ in range(args.repeats):
        for key, decoder in decoders.items():
            runs[key].append(decoder.generate(prompts))
        runs["transformers"].append(torch_generate(reference, prompts, args.max_new_tokens, eos))
    best = {key: [min(per_prompt, key=lambda r: r.seconds) for per_prompt in zip(*r)] for key, r in runs.items()}
    ar_tokens = [r.token_ids for r in best[("scan", "ar")]]
    baseline = tokens_per_second(best[("scan", "ar")])
    rows = []
    for key, results in best.items():
        loop, method = key if key != "transformers" else ("", "transformers generate")
        speed = tokens_per_second(results)
        same = sum(r.token_ids == t for r, t in zip(results, ar_tokens))
        passes = sum(r.forward_passes for r in results) if key != "transformers" else None
        rows.append({"loop": loop, "method": method, "tpf": passes and sum(len(r.token_ids) for r in results) / passes,
                     "tokens_per_s": speed, "vs_scan_ar": speed / baseline, "compile_s": compile_seconds.get(key),
                     "same_text": same})
    print(harness.table(rows, [("layer loop", "loop", ""), ("method", "method", ""), ("TPF", "tpf", ".2f"),
                               ("tokens/s", "tokens_per_s", ".1f"), ("vs scan AR", "vs_scan_ar", ".2f"),
                               ("compile s", "compile_s", ".1f"), (f"text = AR (of {len(prompts)})", "same_text", "")]))
    harness.write(args.out, rows, args)


if __name__ == "__main__":
    main()
