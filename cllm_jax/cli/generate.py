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
import dataclasses
import json
import sys

from tqdm import tqdm

from cllm_jax.cli.decoding import (add_method_arguments, add_model_arguments, add_prompt_arguments, decoding_setup,
                                   load_for_decoding, prompt_token_ids)
from cllm_jax.decode.options import Batching
from cllm_jax.decode.registry import METHODS


def run_method(model, method: str, options, prompts, batching: Batching, show_progress: bool):
    from cllm_jax.decode.engine import Decoder, summarize

    decoder = Decoder(model, method, options=options, **dataclasses.asdict(batching))
    results = []
    with tqdm(total=len(prompts), desc=method, unit="prompt", disable=not show_progress, file=sys.stderr) as bar:
        for batch in decoder.generate_batches(prompts):
            results += batch
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{summarize(results)['tokens_per_second']:.1f}")
    return results


def print_results(results, tokenizer, method: str, as_json: bool) -> None:
    from cllm_jax.parallel.distributed import is_main_process

    if not is_main_process():  # every process holds every result; one prints them
        return
    for r in results:
        text = tokenizer.decode(r.token_ids) if tokenizer is not None else None
        if as_json:
            print(json.dumps({
                "method": method, "prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "text": text,
                "forward_passes": r.forward_passes, "tokens_per_forward": round(r.tokens_per_forward, 4),
                "iterations_per_block": round(r.iterations_per_block, 4), "fast_forwarded": r.fast_forwarded,
                "stationary": r.stationary, "seconds": round(r.seconds, 4), "compile_seconds": round(r.compile_seconds, 4),
                "tokens_per_second": round(len(r.token_ids) / r.seconds, 2) if r.seconds > 0 else None,
            }))  # fmt: skip
        else:
            print(text if text is not None else r.token_ids)
            print(f"  [{method}] {len(r.token_ids)} tokens, {r.forward_passes} forward passes, TPF {r.tokens_per_forward:.2f}\n")


def describe(summary: dict, method: str) -> str:
    return (
        f"{method}: {summary['tokens']} tokens, TPF {summary['tokens_per_forward']:.2f}, "
        f"{summary['tokens_per_second']:.1f} tokens/s, {summary['seconds']:.2f} s (+{summary['compile_seconds']:.1f} s compile)"
    )


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
