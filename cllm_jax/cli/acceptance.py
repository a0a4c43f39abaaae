"""`decode.py acceptance`: placeholder drafters scored on the base model's own text, without decoding."""

from __future__ import annotations

import argparse
import json
import sys

from tqdm import tqdm

from cllm_jax.cli.decoding import add_prompt_arguments, prompt_token_ids
from cllm_jax.errors import InputError


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
