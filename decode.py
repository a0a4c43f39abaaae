"""Decode prompts with autoregressive or Jacobi decoding; `decode.py collect` writes trajectories.

    python decode.py --prompt "What is 7 * 8?" --method jacobi --compare ar
    python decode.py --dataset gsm8k-eval --limit 8 --method jacobi-rolling --json
    python decode.py collect --dataset gsm8k --limit 100 --out runs/traj [--shard 0/2]
    python decode.py merge --out runs/traj runs/traj-0 runs/traj-1
"""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from cllm_jax.decode.engine import METHODS, Decoder, DecodeSettings, summarize
from cllm_jax.decode.guess import INIT_STRATEGIES
from cllm_jax.decode.sampling import Sampling
from cllm_jax.errors import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face directory, .gguf file or training run (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (fp32 on CPU)")
    parser.add_argument("--block-size", type=int, default=16, help="Jacobi block (window) size n")
    parser.add_argument("--init", default="prefix-sample", choices=INIT_STRATEGIES, help="initial guess of a block")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--prompts", help="JSONL file with a 'prompt' field per line")
    parser.add_argument("--prompt-ids", action="append", default=[], help="raw token ids, e.g. 1,2,3 (repeatable)")
    parser.add_argument("--dataset", help="built-in prompts: gsm8k, gsm8k-eval, sharegpt, humaneval")
    parser.add_argument("--limit", type=int, help="use only the first N prompts of --prompts / --dataset")
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="apply the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="feed the prompt text as is")


def prompt_token_ids(args, tokenizer) -> list[list[int]]:
    """All prompts as token ids, in the order given: texts, file, dataset, then raw ids."""
    from cllm_jax.data.prompts import load_prompts

    texts = list(args.prompt)
    for source in (args.prompts, args.dataset):
        if source:
            texts += [example.prompt for example in load_prompts(source, limit=args.limit)]
    ids = []
    if texts:
        if tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids with --prompt-ids 1,2,3")
        chat = tokenizer.has_chat_template if args.chat is None else args.chat
        if chat and not tokenizer.has_chat_template:
            raise InputError("--chat was given but the model has no chat template: use --no-chat")
        ids = [tokenizer.chat_ids(t) if chat else tokenizer.encode(t) for t in texts]
    for raw in args.prompt_ids:
        try:
            ids.append([int(t) for t in raw.replace(" ", "").split(",") if t])
        except ValueError:
            raise InputError(f"--prompt-ids '{raw}' is not a comma-separated list of integers") from None
    if not ids:
        raise InputError("no prompts: pass --prompt TEXT, --prompts FILE, --dataset NAME or --prompt-ids 1,2,3")
    return ids


def settings_from(args, loaded, method: str, record: bool = False) -> DecodeSettings:
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else loaded.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    if args.block_size < 1 or args.max_new_tokens < 1:
        raise InputError("--block-size and --max-new-tokens must be at least 1")
    sampling = Sampling(getattr(args, "temperature", 0.0), getattr(args, "top_k", 0), getattr(args, "top_p", 1.0), args.seed)
    return DecodeSettings(
        method, args.max_new_tokens, args.block_size, args.init, sampling, eos, pad, args.batch_size, record, args.seed
    )


def run_method(loaded, prompts, settings: DecodeSettings, show_progress: bool):
    decoder = Decoder(loaded.model, settings)
    results = []
    with tqdm(total=len(prompts), desc=settings.method, unit="prompt", disable=not show_progress, file=sys.stderr) as bar:
        for batch in decoder.generate_batches(prompts):
            results += batch
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{summarize(results)['tokens_per_second']:.1f}")
    return results


def print_results(results, tokenizer, method: str, as_json: bool) -> None:
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


def decode_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--method", default="ar", choices=METHODS)
    parser.add_argument("--compare", choices=METHODS, help="also run this method on the same prompts; print the speedup")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="one JSON line per prompt on stdout")
    args = parser.parse_args(argv)

    from cllm_jax.weights.load import load_model

    loaded = load_model(args.model, dtype=args.dtype)
    prompts = prompt_token_ids(args, loaded.tokenizer)
    summaries = {}
    for method in [args.method] + ([args.compare] if args.compare and args.compare != args.method else []):
        results = run_method(loaded, prompts, settings_from(args, loaded, method), show_progress=len(prompts) > 1)
        print_results(results, loaded.tokenizer, method, args.json)
        summaries[method] = summarize(results)
        print(describe(summaries[method], method), file=sys.stderr)
    if len(summaries) == 2:
        ours, baseline = (summaries[m] for m in summaries)
        speedup = ours["tokens_per_second"] / max(baseline["tokens_per_second"], 1e-9)
        print(f"speedup of {args.method} over {args.compare}: {speedup:.2f}x (TPF {ours['tokens_per_forward']:.2f} "
              f"vs {baseline['tokens_per_forward']:.2f})", file=sys.stderr)  # fmt: skip


def collect_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py collect", description="Collect Jacobi trajectories.")
    parser.add_argument("--model", help="Hugging Face directory, .gguf file or training run (default: SmolLM2)")
    parser.add_argument("--dataset", help="gsm8k (its collection split), sharegpt, humaneval")
    parser.add_argument("--prompts", help="JSONL file with a 'prompt' field (and --answer-field)")
    parser.add_argument("--answer-field", help="field of --prompts holding a ground-truth answer (labels_ids)")
    parser.add_argument("--limit", type=int, help="number of prompts")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds this run)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--use-aug", action="store_true", help="add partly corrected states (reference use_aug)")
    parser.add_argument("--no-clean", dest="clean", action="store_false", help="keep records with 10-token repeats")
    parser.add_argument("--no-chat", dest="chat", action="store_false", help="do not apply the chat template")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard", help="i/N: collect every N-th prompt starting at i (merge the shards after)")
    args = parser.parse_args(argv)

    from cllm_jax.data.collect import CollectOptions, collect
    from cllm_jax.data.prompts import load_prompts
    from cllm_jax.weights.load import load_model

    if bool(args.dataset) == bool(args.prompts):
        raise InputError("give exactly one of --dataset NAME and --prompts FILE")
    shard = None
    if args.shard:
        try:
            shard = tuple(int(x) for x in args.shard.split("/"))
            assert len(shard) == 2
        except (ValueError, AssertionError):
            raise InputError(f"--shard '{args.shard}' is not of the form i/N, e.g. 0/4") from None
    source = args.dataset or args.prompts
    extra = {"answer_field": args.answer_field} if args.prompts and args.answer_field else {}
    examples = load_prompts(source, limit=args.limit, **extra)
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise InputError("collection needs a model with a tokenizer")
    options = CollectOptions(args.block_size, args.max_new_tokens, args.use_aug, args.clean, chat=args.chat,
                             seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    bar = tqdm(desc="collect", unit="prompt", file=sys.stderr)
    tokens = 0

    def on_batch(results, left):
        nonlocal tokens
        tokens += sum(len(r.token_ids) for r in results)
        bar.total = bar.n + len(results) + left
        bar.update(len(results))
        bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")

    summary = collect(loaded, examples, args.out, options, source=str(source), shard=shard, on_batch=on_batch)
    bar.close()
    print(json.dumps(summary, indent=2))


def merge_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py merge", description="Merge collection shards into one run.")
    parser.add_argument("--out", required=True)
    parser.add_argument("shards", nargs="+", help="the shard directories")
    args = parser.parse_args(argv)
    from cllm_jax.data.trajectories import merge_shards

    print(json.dumps(merge_shards(args.shards, args.out), indent=2))


def main(argv: list[str] | None = None) -> int:
    from cllm_jax.cli import run_commands

    return run_commands(
        sys.argv[1:] if argv is None else argv,
        {"collect": collect_main, "merge": merge_main},
        decode_main,
        error_status=2,
        resume_hint="rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
