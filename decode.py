"""Decode prompts with autoregressive or Jacobi decoding; `decode.py collect` writes trajectories.

    python decode.py --prompt "What is 7 * 8?" --method jacobi --compare ar
    python decode.py --dataset gsm8k-eval --limit 8 --method jacobi-rolling --json
    python decode.py collect --dataset gsm8k --limit 100 --out runs/traj [--shard 0/2]
    python decode.py merge --out runs/traj runs/traj-0 runs/traj-1
    python decode.py chat [--model DIR|org/name] [--method jacobi-rolling]   # /reset, /method NAME
    python decode.py demo   # `make demo`: the newest trained CLLM (else the base model), Jacobi vs AR
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from tqdm import tqdm

from cllm_jax.decode.engine import METHODS, Decoder, DecodeSettings, summarize
from cllm_jax.decode.guess import INIT_STRATEGIES
from cllm_jax.decode.sampling import Sampling
from cllm_jax.errors import InputError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face directory, .gguf file, training run, or hub id org/name[@revision] "
                        "from the local Hugging Face cache (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (fp32 on CPU)")
    parser.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "per_layer"],
                        help="decoder layers as one scan or a per-layer loop (auto: by backend and model size)")
    parser.add_argument("--block-size", type=int, default=16, help="Jacobi block (window) size n")
    parser.add_argument("--blocks", type=int, default=2, help="jacobi-multiblock: K blocks in flight")
    parser.add_argument("--spawn-ratio", type=float, default=0.85,
                        help="jacobi-multiblock: start a block behind the newest when ceil(r * n) of it are accepted")
    parser.add_argument("--recycle", type=int, default=0,
                        help="jacobi-rolling / jacobi-multiblock: verify candidates from the last P rejected tails (0: off)")
    # lookup, not the reference's prefix-sample: the same output, and the fewest passes on every row measured
    # (reports/smollm2_gsm8k_jf). The library (DecodeSettings) and collection keep prefix-sample.
    parser.add_argument("--init", default="lookup", choices=INIT_STRATEGIES,
                        help="initial guesses of a block (default lookup; prefix-sample is the reference's)")
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


def check_options(args) -> None:
    """Values no model can satisfy, refused before the model loads (one line each)."""
    for name in ("block_size", "max_new_tokens", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if getattr(args, "temperature", 0.0) < 0:
        raise InputError(f"--temperature must be >= 0 (0 = greedy decoding), got {args.temperature}")
    if not 0 < getattr(args, "top_p", 1.0) <= 1:
        raise InputError(f"--top-p must be in (0, 1] (1 = no nucleus filtering), got {args.top_p}")
    if getattr(args, "top_k", 0) < 0:
        raise InputError(f"--top-k must be >= 0 (0 = no top-k filtering), got {args.top_k}")
    if getattr(args, "blocks", 1) < 1:
        raise InputError(f"--blocks must be at least 1 (1 = rolling Jacobi), got {args.blocks}")
    if not 0 < getattr(args, "spawn_ratio", 1.0) <= 1:
        raise InputError(f"--spawn-ratio must be in (0, 1] (0.85 is Jacobi Forcing's), got {args.spawn_ratio}")
    if getattr(args, "recycle", 0) < 0:
        raise InputError(f"--recycle must be >= 0 (0 = no rejection recycling), got {args.recycle}")


def settings_from(args, loaded, method: str, record: bool = False) -> DecodeSettings:
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id if tokenizer is not None else loaded.config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    check_options(args)
    context = loaded.config.max_position_embeddings
    if method != "ar" and args.block_size >= context:
        raise InputError(f"--block-size {args.block_size} does not fit the model's context of {context} tokens: "
                         f"use a block of a few dozen tokens (16 is the paper's)")
    if method != "ar" and args.block_size + args.max_new_tokens >= context:
        raise InputError(f"--max-new-tokens {args.max_new_tokens} plus --block-size {args.block_size} leave no room "
                         f"for a prompt in the model's context of {context} tokens: lower one of them")
    sampling = Sampling(getattr(args, "temperature", 0.0), getattr(args, "top_k", 0), getattr(args, "top_p", 1.0), args.seed)
    return DecodeSettings(
        method, args.max_new_tokens, args.block_size, args.init, sampling, eos, pad, args.batch_size, record, args.seed,
        getattr(args, "blocks", 2), getattr(args, "spawn_ratio", 0.85), getattr(args, "recycle", 0),
    )  # fmt: skip


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
    check_options(args)

    from cllm_jax.weights.load import load_model

    # weights stored in the compute dtype: decoding reads every weight once per pass, so bf16 halves it
    loaded = load_model(args.model, dtype=args.dtype, layer_loop=args.layer_loop, weights_dtype=args.dtype)
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
    return summaries


def collect_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py collect", description="Collect Jacobi trajectories.")
    parser.add_argument("--model", help="Hugging Face directory, .gguf file, training run or cached hub id org/name "
                        "(default: SmolLM2)")
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
    options = CollectOptions(args.block_size, args.max_new_tokens, args.use_aug, args.clean, chat=args.chat,
                             seed=args.seed, batch_size=args.batch_size)  # fmt: skip  (checked before any work)
    source = args.dataset or args.prompts
    extra = {"answer_field": args.answer_field} if args.prompts and args.answer_field else {}
    examples = load_prompts(source, limit=args.limit, **extra)
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise InputError("collection needs a model with a tokenizer")
    bar, tokens = None, 0

    def on_batch(results, left):
        nonlocal bar, tokens
        bar = bar or tqdm(desc="collect", unit="prompt", file=sys.stderr)  # from the first batch: none before an error
        tokens += sum(len(r.token_ids) for r in results)
        bar.total = bar.n + len(results) + left
        bar.update(len(results))
        bar.set_postfix(tok_s=f"{tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")

    try:
        summary = collect(loaded, examples, args.out, options, source=str(source), shard=shard, on_batch=on_batch)
    finally:
        if bar is not None:
            bar.close()  # ends the bar's line, so an error stands on its own
    print(json.dumps(summary, indent=2))


def merge_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py merge", description="Merge collection shards into one run.")
    parser.add_argument("--out", required=True)
    parser.add_argument("shards", nargs="+", help="the shard directories")
    args = parser.parse_args(argv)
    from cllm_jax.data.trajectories import merge_shards

    print(json.dumps(merge_shards(args.shards, args.out), indent=2))


def chat_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py chat", description="Chat under the model's chat template; "
                                     "answers stream as they decode. In the chat: /reset, /method NAME; Ctrl-D quits.")
    add_model_arguments(parser)
    parser.add_argument("--method", default="jacobi-rolling", choices=METHODS)
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    check_options(args)

    from cllm_jax.decode.chat import ChatSession
    from cllm_jax.weights.load import load_model

    # weights stored in the compute dtype: decoding reads every weight once per pass, so bf16 halves it
    loaded = load_model(args.model, dtype=args.dtype, layer_loop=args.layer_loop, weights_dtype=args.dtype)
    session = ChatSession(loaded, settings_from(args, loaded, args.method), system=args.system)
    say = functools.partial(print, file=sys.stderr, flush=True)
    say(f"chatting with {loaded.path} ({session.method}); /reset, /method {'|'.join(METHODS)}; Ctrl-D quits")
    try:
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "").strip()
            except EOFError:
                return
            command, _, value = line.partition(" ")
            if command == "/reset":
                session.reset()
                say("[conversation cleared]")
            elif command == "/method":
                try:
                    session.set_method(value.strip())
                    say(f"[method: {session.method}]")
                except InputError as error:
                    say(f"[{error}]")
            elif line.startswith("/"):
                say("[commands: /reset, /method NAME]")
            elif line:
                _, stats = session.reply(line, on_text=lambda text: print(text, end="", flush=True))
                print(flush=True)
                say(f"[{session.method}: {stats.tokens} tokens, TPF {stats.tokens_per_forward:.2f}, "
                    f"{stats.tokens_per_second:.1f} tokens/s]")
    except KeyboardInterrupt:
        say("")  # Ctrl-C ends the chat like end of input: no traceback, exit status 0


DEMO_BLOCK_SIZE = 8  # the fastest n on a CPU, where a 16-token pass costs about twice an 8-token one


def demo_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py demo", description="Rolling Jacobi (lookup guesses) against AR "
                                     "on GSM8K questions, with the newest trained CLLM if there is one, else the base "
                                     "model.")  # fmt: skip
    parser.add_argument("--runs", default="runs", help="where `make cllm` (train.py pipeline) leaves its runs")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)

    from cllm_jax.evaluate.demo import closing_statement, newest_cllm

    cllm = newest_cllm(args.runs)
    print(f"model: {cllm or 'the base model, SmolLM2-135M-Instruct (no trained CLLM under ' + args.runs + '/)'}",
          file=sys.stderr)  # fmt: skip
    decode_args = ["--dataset", "gsm8k-eval", "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
                   "--method", "jacobi-rolling", "--init", "lookup", "--block-size", str(DEMO_BLOCK_SIZE),
                   "--compare", "ar"] + (["--model", str(cllm)] if cllm else [])  # fmt: skip
    summaries = decode_main(decode_args)
    print(closing_statement(cllm, summaries["jacobi-rolling"], summaries["ar"], args.limit, DEMO_BLOCK_SIZE),
          file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from cllm_jax.cli import run_commands

    return run_commands(
        sys.argv[1:] if argv is None else argv,
        {"collect": collect_main, "merge": merge_main, "chat": chat_main, "demo": demo_main},
        decode_main,
        error_status=2,
        resume_hint="rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
