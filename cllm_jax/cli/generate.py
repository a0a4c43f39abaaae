"""Decode prompts with autoregressive or Jacobi decoding; `decode.py collect` writes trajectories.

    python decode.py --prompt "What is 7 * 8?" --method jacobi --compare ar
    python decode.py --dataset gsm8k-eval --limit 8 --method jacobi-rolling --json
    python decode.py collect --dataset gsm8k --limit 100 --out runs/traj [--shard 0/2]
    python decode.py merge --out runs/traj runs/traj-0 runs/traj-1
    python decode.py chat [--model DIR|org/name] [--method jacobi-rolling]   # /reset, /method NAME
    python decode.py demo   # `make demo`: the newest trained CLLM (else the base model), Jacobi vs AR
    python decode.py acceptance --draft-adapter smollm2-gsm8k [--draft-adapter DIR ...] --dataset sharegpt
"""

from __future__ import annotations

import argparse
import sys

from cllm_jax.cli.decoding import (add_method_arguments, add_model_arguments, add_prompt_arguments, decoding_setup,
                                   describe, load_for_decoding, print_results, prompt_token_ids, run_method)
from cllm_jax.decode.registry import METHODS


def decode_main(argv: list[str], keep_tokens: bool = False) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    fields = add_method_arguments(parser, default="ar")
    parser.add_argument("--compare", choices=list(METHODS), help="also run this method on the same prompts; "
                        "print the speedup")
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt on stdout")
    args = parser.parse_args(argv)

    from cllm_jax.decode.engine import summarize

    methods = [args.method] + ([args.compare] if args.compare and args.compare != args.method else [])
    loaded = load_for_decoding(args)
    prompts = prompt_token_ids(args, loaded.tokenizer)
    summaries, names = {}, []  # names as run: an adapter model turns a rolling method into jacobi-lossless
    for method in methods:
        others = tuple(m for m in methods if m != method)
        name, model, options, batching = decoding_setup(args, fields, loaded, method, others)
        names.append(name)
        results = run_method(model, name, options, prompts, batching, show_progress=len(prompts) > 1)
        print_results(results, loaded.tokenizer, name, args.json)
        summaries[method] = summarize(results) | ({"token_ids": [r.token_ids for r in results]} if keep_tokens else {})
        print(describe(summaries[method], name), file=sys.stderr)
    if len(summaries) == 2:
        ours, baseline = (summaries[m] for m in summaries)
        speedup = ours["tokens_per_second"] / max(baseline["tokens_per_second"], 1e-9)
        print(f"speedup of {names[0]} over {names[1]}: {speedup:.2f}x (TPF {ours['tokens_per_forward']:.2f} "
              f"vs {baseline['tokens_per_forward']:.2f})", file=sys.stderr)  # fmt: skip
    return summaries
