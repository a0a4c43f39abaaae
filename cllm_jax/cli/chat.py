"""`decode.py chat` (a conversation, answers streamed as they decode) and `decode.py demo` (a drafter or
a trained CLLM against AR on a few GSM8K questions: what `make demo` shows)."""

from __future__ import annotations

import argparse
import functools
import sys

from cllm_jax.cli.decoding import add_method_arguments, add_model_arguments, decoding_setup, load_for_decoding
from cllm_jax.cli.generate import decode_main
from cllm_jax.decode.registry import METHODS
from cllm_jax.errors import InputError


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
