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
import functools
import json
import sys

from tqdm import tqdm

from cllm_jax.cli import add_option_flags, collect_progress, flag_error, given_flags
from cllm_jax.decode.options import BATCHING_FIELDS, Batching, Sampling
from cllm_jax.decode.registry import METHODS, get_method, resolve_method
from cllm_jax.errors import InputError

# Flags no user sets: the EOS and the pad token come from the tokenizer, recording from `collect`.
_NOT_FLAGS = ("eos_id", "pad_id", "record", "sampling")
_SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "seed")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face directory, .gguf file, training run, built-in name "
                        "(smollm2-135m, qwen2.5-coder-0.5b) or hub id org/name[@revision] from the local Hugging Face "
                        "cache (default: smollm2-135m); a run trained with an adapter drafts losslessly")
    parser.add_argument("--draft-adapter", metavar="NAME|DIR", help="a shipped drafter (smollm2-gsm8k), a PEFT "
                        "adapter or an adapter run, that drafts while the model verifies: a placeholder drafter "
                        "decodes with lossless-placeholder, a consistency adapter makes rolling/multiblock Jacobi "
                        "lossless (jacobi-lossless)")
    parser.add_argument("--merge-adapter", action="store_true", help="fold the adapter into the weights instead: "
                        "a lossy CLLM, its own text")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype (fp32 on CPU)")
    parser.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "per_layer"],
                        help="decoder layers as one scan or a per-layer loop (auto: per_layer on a CPU, "
                        "by model size on an accelerator)")
    add_mesh_argument(parser)


def add_mesh_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mesh", metavar="data=D,tensor=T", help="decode over a device mesh: weights, heads and "
                        "KV cache split over tensor, prompts over data (default: one device)")
    parser.add_argument("--coordinator", metavar="HOST:PORT", help="several processes, one mesh over all their "
                        "devices (jax.distributed; 'auto': detected on a cluster); with --num-processes, --process-id")
    parser.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, help=argparse.SUPPRESS)


def use_mesh(args, local: bool = False):
    """The --mesh for every decoder of this command; a context in which the model loads into host memory,
    so that a model larger than one device reaches the mesh in shards. `local`: over this process's
    devices only (collection, where every process collects its own shard of the prompts)."""
    import contextlib

    from cllm_jax.parallel import decode_mesh, distributed

    if getattr(args, "coordinator", None):  # before anything touches a device
        distributed.initialize(True, None if args.coordinator == "auto" else args.coordinator, args.num_processes,
                               args.process_id)
    import jax

    mesh = decode_mesh.mesh_from_text(getattr(args, "mesh", None), jax.local_devices() if local else None)
    decode_mesh.activate(mesh)
    if mesh is None:
        return contextlib.nullcontext()

    return jax.default_device(jax.local_devices(backend="cpu")[0])


def add_method_arguments(parser: argparse.ArgumentParser, default: str) -> dict:
    """--method and one flag per option of any method (cllm_jax/decode/registry.py), of sampling and of
    batching; returns the fields."""
    summaries = "; ".join(f"{name}: {m.summary}" for name, m in METHODS.items())
    parser.add_argument("--method", default=default, choices=list(METHODS), help=summaries)
    classes = [m.options for m in METHODS.values()] + [Sampling, Batching]
    return add_option_flags(parser, classes, skip=_NOT_FLAGS)


def load_for_decoding(args):
    """The model of --model, with --draft-adapter attached or (--merge-adapter) folded in."""
    from cllm_jax.model.llama import merge_adapter as merge
    from cllm_jax.weights.load import load_model, resolve_adapter
    from cllm_jax.weights.peft import load_adapter

    # weights stored in the compute dtype: decoding reads every weight once per pass, so bf16 halves it
    with use_mesh(args):
        loaded = load_model(args.model, dtype=args.dtype, layer_loop=args.layer_loop, weights_dtype=args.dtype)
    if args.draft_adapter:
        if loaded.model.adapter is not None:
            raise InputError(f"{args.model} carries an adapter already: pass its base model with --draft-adapter")
        load_adapter(loaded.model, resolve_adapter(args.draft_adapter))
    if args.merge_adapter:
        if loaded.model.adapter is None:
            raise InputError("--merge-adapter needs an adapter: --draft-adapter DIR or an adapter run as --model")
        merge(loaded.model)
    return loaded
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
    from cllm_jax.data.sources import load_prompts

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


def decoding_setup(args, fields: dict, loaded, method: str, others: tuple[str, ...] = ()):
    """(method name, model, options, batching) for `method` from the flags; refuses a flag that no method of this run
    takes (`others`: the other methods run beside it), and sampling filters under greedy decoding."""
    import copy

    model = loaded.model
    given = given_flags(args, fields)
    runs = [get_method(m) for m in (method, *others)]
    for name in given:
        if name not in _SAMPLING_FLAGS + BATCHING_FIELDS and not any(name in _field_names(m) for m in runs):
            raise InputError(f"--{name.replace('_', '-')} does not apply to --method {' / '.join(m.name for m in runs)}")
    if given.get("temperature", 0.0) == 0.0 and any(k in given for k in ("top_k", "top_p")):
        raise InputError("--top-k / --top-p filter sampling, but decoding is greedy: give --temperature above 0")
    # load_for_decoding has merged the adapter already when --merge-adapter is given
    resolved = resolve_method(method, model.adapter is not None or args.merge_adapter, args.merge_adapter,
                              placeholder_drafter=getattr(model.adapter, "placeholders", None) is not None)
    spec = resolved.method
    method = spec.name
    if resolved.adapter == "set_aside":
        model = copy.copy(model)
        model.adapter = None
    values = {k: v for k, v in given.items() if k in _field_names(spec) and k not in _SAMPLING_FLAGS}
    try:
        sampling = Sampling(**{k: given[k] for k in _SAMPLING_FLAGS if k in given})
        batching = Batching(**{k: given[k] for k in BATCHING_FIELDS if k in given})
        tokenizer = loaded.tokenizer
        eos = tokenizer.eos_token_id if tokenizer is not None else loaded.config.eos_token_id
        if "pad_id" in _field_names(spec):
            values["pad_id"] = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
        options = spec.make_options(**values, eos_id=eos, sampling=sampling)
    except InputError:
        raise
    except Exception as error:  # an option out of its declared range: one line, in terms of the flag
        raise flag_error(error) from None
    vocab = loaded.config.vocab_size
    if not options.sampling.greedy and options.sampling.top_k > vocab:
        raise InputError(f"--top-k {options.sampling.top_k} is more tokens than the model's vocabulary of {vocab}: "
                         f"give at most {vocab} (or 0: all)")
    context = loaded.config.max_position_embeddings
    if options.lookahead >= context:
        raise InputError(f"--block-size {options.lookahead} does not fit the model's context of {context} tokens: "
                         f"use a block of a few dozen tokens (16 is the paper's)")
    if options.max_new_tokens + options.lookahead >= context:
        raise InputError(f"--max-new-tokens {options.max_new_tokens} plus a window of {options.lookahead} leave no "
                         f"room for a prompt in the model's context of {context} tokens: lower one of them")
    _check_working_memory(options, loaded.config, batching.batch_size, given)
    return method, model, options, batching


def _check_working_memory(options, config, batch_size: int, given: dict) -> None:
    """Refuse settings whose smallest pass (the shortest prompt) needs more memory than the machine has."""
    from cllm_jax.decode.engine import check_memory
    from cllm_jax.decode.prefill import bucket_length, cache_length_for

    slots = cache_length_for(bucket_length(1), options.max_new_tokens, options.lookahead)
    shaping = [f"--{name.replace('_', '-')}" for name in ("recycle", "blocks", "block_size") if name in given]
    check_memory(options.working_bytes(config, batch_size, slots), "one decoding pass",
                 "lower the batch size or the number of new tokens" + (f" (or {', '.join(shaping)})" if shaping else ""))


def _field_names(method) -> set[str]:
    return {f.name for f in dataclasses.fields(method.options)}


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


def collect_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py collect", description="Collect Jacobi trajectories.")
    parser.add_argument("--model", help="Hugging Face directory, .gguf file, training run or cached hub id org/name "
                        "(default: SmolLM2)")
    parser.add_argument("--dataset", help="gsm8k (its collection split), sharegpt, humaneval")
    parser.add_argument("--prompts", help="JSONL file with a 'prompt' field (and --answer-field)")
    parser.add_argument("--answer-field", help="field of --prompts holding a ground-truth answer (labels_ids)")
    parser.add_argument("--limit", type=int, help="number of prompts")
    parser.add_argument("--out", required=True, help="output directory (resumed if it holds this run)")
    parser.add_argument("--shard", help="i/N: collect every N-th prompt starting at i (merge the shards after)")
    add_mesh_argument(parser)
    from cllm_jax.data.collect import CollectOptions, collect

    fields = add_option_flags(parser, [CollectOptions])
    args = parser.parse_args(argv)

    from cllm_jax.data.sources import load_prompts
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
    try:
        options = CollectOptions(**given_flags(args, fields))  # checked before any work
    except Exception as error:
        raise flag_error(error) from None
    source = args.dataset or args.prompts
    extra = {"answer_field": args.answer_field} if args.prompts and args.answer_field else {}
    examples = load_prompts(source, limit=args.limit, **extra)
    with use_mesh(args, local=True):
        loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise InputError("collection needs a model with a tokenizer")
    on_batch = collect_progress()
    try:
        summary = collect(loaded, examples, args.out, options, source=str(source), shard=shard, on_batch=on_batch)
    finally:
        on_batch.close()
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
    fields = add_method_arguments(parser, default="jacobi-rolling")
    parser.add_argument("--system", help="a system message opening the conversation")
    parser.add_argument("--no-drafter", action="store_true", help="do not draft with the drafter shipped for a "
                        "built-in model (weights/drafters.py)")
    args = parser.parse_args(argv)

    from cllm_jax.decode.chat import ChatSession
    from cllm_jax.errors import CllmError
    from cllm_jax.weights.builtin import BUILTIN_MODELS
    from cllm_jax.weights.drafters import drafter_for

    builtin = args.model is None or args.model in BUILTIN_MODELS
    if builtin and not args.draft_adapter and not args.merge_adapter and not args.no_drafter and drafter_for(args.model):
        args.draft_adapter = drafter_for(args.model)  # a built-in model chats losslessly with its shipped drafter
    loaded = load_for_decoding(args)
    # a flag applies while the chat runs a method that takes it: /method may switch to any of them
    session = ChatSession(loaded, lambda method: decoding_setup(args, fields, loaded, method, tuple(METHODS)),
                          args.method, system=args.system)
    say = functools.partial(print, file=sys.stderr, flush=True)
    say(f"chatting with {loaded.path} ({session.method}); /reset, /method {'|'.join(METHODS)}; Ctrl-D quits")
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach us as surrogates, not as an exception
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        while True:
            try:
                line = input("> " if sys.stdin.isatty() else "").strip()
            except EOFError:
                return
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:
                say("[error: that line is not UTF-8 text; type it again]")
                continue
            command, _, value = line.partition(" ")
            try:
                if command == "/reset":
                    session.reset()
                    say("[conversation cleared]")
                elif command == "/method":
                    session.set_method(value.strip())
                    say(f"[method: {session.method}]")
                elif line.startswith("/"):
                    say("[commands: /reset, /method NAME]")
                elif line:
                    _, stats = session.reply(line, on_text=lambda text: print(text, end="", flush=True))
                    print(flush=True)
                    say(f"[{session.method}: {stats.tokens} tokens, TPF {stats.tokens_per_forward:.2f}, "
                        f"{stats.tokens_per_second:.1f} tokens/s]")
            except CllmError as error:  # one bad line ends neither the chat nor the conversation
                say(f"[error: {error}]")
    except KeyboardInterrupt:
        say("")  # Ctrl-C ends the chat like end of input: no traceback, exit status 0


DEMO_BLOCK_SIZE = 8  # the fastest n on a CPU, where a 16-token pass costs about twice an 8-token one


def demo_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py demo", description="Jacobi decoding with lookup guesses "
                                     "against AR on GSM8K questions: lossless with the newest trained adapter, or "
                                     "the newest fully trained CLLM, else the base model.")  # fmt: skip
    parser.add_argument("--runs", default="runs", help="where `make cllm` (train.py pipeline) leaves its runs")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    for flag, value in (("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise InputError(f"demo {flag} must be at least 1, got {value}")

    from cllm_jax.evaluate.demo import closing_statement, newest_cllm
    from cllm_jax.weights.drafters import drafter_for
    from cllm_jax.weights.peft import is_adapter_dir, read_extra

    cllm = newest_cllm(args.runs)
    lossless = cllm is not None and is_adapter_dir(cllm)
    shipped = drafter_for(None) if cllm is None else None  # a fresh clone: the drafter that ships
    placeholder_run = lossless and bool(read_extra(cllm).get("placeholders"))
    what = ("the base model, SmolLM2-135M-Instruct (no trained CLLM under " + args.runs + "/)" if cllm is None
            else f"{cllm} ({'an adapter: lossless, the base model verifies' if lossless else 'a lossy CLLM'})")
    if shipped:
        what = f"SmolLM2-135M-Instruct with the shipped placeholder drafter {shipped} (lossless: the base verifies)"
    print(f"model: {what}", file=sys.stderr)
    common = ["--dataset", "gsm8k-eval", "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens),
              "--compare", "ar"]
    if shipped or placeholder_run:
        method = "lossless-placeholder"
        # the fastest measured layout on a 2-core CPU (reports/smollm2_gsm8k_drafter): each placeholder costs
        # pass time there, so 3 drafts with groups after the drafter's tokens only, lookup beside them
        decode_args = ["--draft-adapter", shipped or str(cllm), "--method", method, "--drafts", "3", "--groups", "main"]
    else:
        method = "jacobi-rolling"
        decode_args = ["--method", method, "--init", "lookup", "--block-size", str(DEMO_BLOCK_SIZE)]
        decode_args += ["--model", str(cllm)] if cllm else []
    runs = decode_main(common + decode_args, keep_tokens=True)
    jacobi, ar = runs[method], runs["ar"]
    identical = sum(a == b for a, b in zip(jacobi["token_ids"], ar["token_ids"]))
    print(closing_statement(cllm, jacobi, ar, args.limit, DEMO_BLOCK_SIZE, lossless, identical, shipped=shipped),
          file=sys.stderr)


def acceptance_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="decode.py acceptance", description="Placeholder drafters' acceptance by "
                                     "draft position on the base model's own continuations of the prompts, without "
                                     "decoding (cllm_jax/evaluate/draft_acceptance.py): the base decodes once, each "
                                     "drafter is scored at every anchor in one forward per batch.")
    parser.add_argument("--model", help="the base model (default: smollm2-135m)")
    parser.add_argument("--draft-adapter", action="append", required=True, metavar="NAME|DIR",
                        help="a placeholder drafter to score (repeatable: one row each)")
    add_prompt_arguments(parser)
    parser.add_argument("--drafts", type=int, default=4, help="k: the drafts a pass verifies")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="rows of the base model's AR decoding")
    parser.add_argument("--json", action="store_true", help="one JSON object per drafter instead of the table")
    parser.add_argument("--out", metavar="DIR", help="also write DIR/generations.jsonl (the base model's text that "
                        "was scored), DIR/acceptance.jsonl (a line per drafter, with the machine) and the plot "
                        "acceptance.png")
    args = parser.parse_args(argv)
    for flag, value in (("--drafts", args.drafts), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise InputError(f"acceptance {flag} must be at least 1, got {value}")

    from cllm_jax.decode.engine import Decoder
    from cllm_jax.evaluate.draft_acceptance import draft_acceptance
    from cllm_jax.weights.load import load_model, resolve_adapter
    from cllm_jax.weights.peft import is_adapter_dir, load_adapter, read_extra

    adapters = [resolve_adapter(name) for name in args.draft_adapter]  # a bad one fails before any decoding
    for name, path in zip(args.draft_adapter, adapters):
        if not is_adapter_dir(path):
            raise InputError(f"--draft-adapter {name}: {path} holds no adapter (adapter_config.json missing)")
        if not read_extra(path).get("placeholders"):
            raise InputError(f"--draft-adapter {name} is not a placeholder drafter (it has no placeholder "
                             f"embeddings): acceptance scores drafters trained with drafter.placeholders > 0")
    base = load_model(args.model)
    prompts = prompt_token_ids(args, base.tokenizer)
    decoder = Decoder(base.model, "ar", max_new_tokens=args.max_new_tokens, eos_id=base.tokenizer.eos_token_id,
                      batch_size=min(args.batch_size, len(prompts)))
    with tqdm(total=len(prompts), desc="the base model's text", unit="prompt", file=sys.stderr) as bar:
        results = decoder.generate(prompts, on_batch=lambda batch: bar.update(len(batch)))
    sequences = [(p + r.token_ids, len(p)) for p, r in zip(prompts, results)]
    out = None
    if args.out:
        from pathlib import Path

        from cllm_jax.evaluate.machine import describe_machine

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"index": i, "method": "ar (base)", "prompt_ids": p, "token_ids": r.token_ids,
                             "text": base.tokenizer.decode(r.token_ids), "forward_passes": r.forward_passes})
                 for i, (p, r) in enumerate(zip(prompts, results))]
        (out / "generations.jsonl").write_text("\n".join(lines) + "\n")
        (out / "acceptance.jsonl").write_text("")
        machine = describe_machine()
    scored = {}
    for name, path in zip(args.draft_adapter, adapters):
        drafting = load_model(args.model)  # a copy per drafter: attaching one changes the model's pytree
        load_adapter(drafting.model, path)
        figures = {"drafter": name, "drafts": args.drafts, "prompts": len(prompts),
                   **draft_acceptance(drafting.model, sequences, drafts=args.drafts)}
        if out is not None:  # a line per drafter as it is scored: a killed study keeps what it measured
            with open(out / "acceptance.jsonl", "a") as file:
                file.write(json.dumps({**figures, "dataset": args.dataset, "max_new_tokens": args.max_new_tokens,
                                       "machine": machine}) + "\n")
        if args.json:
            print(json.dumps(figures))
        else:
            shares = " / ".join(f"{100 * s:.0f}%" for s in figures["by_position"])
            print(f"{name}: {figures['anchors']} anchors of {len(prompts)} prompts; accepts drafts 1 .. i: {shares}; "
                  f"mean accepted {figures['mean_accepted']:.2f}; decoding's passes replayed: drafter-alone TPF "
                  f"{figures['replayed_tpf']:.2f}")
        scored[name] = {"every anchor": {"by_position": figures["by_position"]}}
    if out is not None:
        from cllm_jax.evaluate.plots import plot_acceptance

        plot_acceptance(scored, out / "acceptance.png")


def main(argv: list[str] | None = None) -> int:
    from cllm_jax.cli import run_commands

    return run_commands(
        sys.argv[1:] if argv is None else argv,
        {"collect": collect_main, "merge": merge_main, "chat": chat_main, "demo": demo_main,
         "acceptance": acceptance_main},
        decode_main,
        error_status=2,
        resume_hint="rerun the same command to resume",
    )


if __name__ == "__main__":
    sys.exit(main())
