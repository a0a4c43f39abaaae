"""`decode.py collect` (Jacobi trajectories of a prompt set, sharded and resumable) and `decode.py merge`."""

from __future__ import annotations

import argparse
import json

from cllm_jax.cli.common import add_option_flags, collect_progress, flag_error, given_flags
from cllm_jax.cli.decoding import add_mesh_argument, use_mesh
from cllm_jax.errors import InputError


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
