"""What every decoding command shares: the model, mesh, method and prompt flags, and the step from
flags to a model, options and batching that decode and chat take."""

from __future__ import annotations

import argparse
import dataclasses

from cllm_jax.cli.common import add_option_flags, flag_error, given_flags
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
