"""Where a CLLM's greedy text leaves the base model's: teacher-forced on the base's own greedy generations.

    python benchmarks/drift.py runs/smollm2_gsm8k_jf/train/export [MORE_MODELS ...] [--prompts 20]

The base model (the built-in SmolLM2 unless --base) decodes the first N held-out GSM8K problems
greedily; each model then reads prompt + that text in one forward pass. Per model: the share of
generated positions whose argmax differs from the base's (per-token mismatch), the first such
position per prompt (where exact decoding of the CLLM starts writing other text), the base's top-2
logit margin there, and the tokens both pick. Exact generation agreement over L tokens needs a
mismatch rate well under 1/L; the evaluation's "same final answer" follows from it on a model whose
answers depend on the whole text. Writes reports/drift/drift.json (or --out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.data.prompts import load_prompts
from cllm_jax.decode.engine import Decoder
from cllm_jax.decode.prefill import bucket_length
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.weights.load import load_model


@jax.jit
def _top2(model, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    hidden, _ = model(tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
    values, indices = jax.lax.top_k(model.logits(hidden)[0], 2)
    return indices[:, 0], values[:, 0] - values[:, 1]


def greedy_choices(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Argmax and top-2 margin at every position of `ids`, padded to a bucket (a few compilations)."""
    tokens = np.zeros((1, bucket_length(len(ids))), np.int32)
    tokens[0, : len(ids)] = ids
    choice, margin = _top2(model, jnp.asarray(tokens))
    return np.asarray(choice)[: len(ids)], np.asarray(margin)[: len(ids)]


def drift(model, base_choices: list[tuple], texts: list[tuple[list[int], list[int]]], decode) -> dict:
    mismatches, firsts, margins, examples = [], [], [], []
    for (prompt, generation), (base_choice, base_margin) in zip(texts, base_choices):
        ids = prompt + generation
        choice, _ = greedy_choices(model, ids)
        at = slice(len(prompt) - 1, len(ids) - 1)  # the positions that predict the generated tokens
        mismatch = choice[at] != base_choice[at]
        differ = np.nonzero(mismatch)[0]
        mismatches.append(float(np.mean(mismatch)))
        first = int(differ[0]) if len(differ) else len(generation)
        firsts.append(first)
        if len(differ):
            position = len(prompt) - 1 + first
            margins.append(float(base_margin[position]))
            examples.append({"after": decode(generation[:first])[-40:], "base": decode([int(base_choice[position])]),
                             "model": decode([int(choice[position])])})
    return {"per_token_mismatch": float(np.mean(mismatches)), "first_divergence": firsts,
            "first_divergence_median": float(np.median(firsts)),
            "identical": int(sum(f == len(g) for f, (_, g) in zip(firsts, texts))),
            "base_margin_at_divergence_median": float(np.median(margins)) if margins else None,
            "examples": examples[:8]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="CLLMs (training runs or exports)")
    parser.add_argument("--base", help="the base model (default: the built-in SmolLM2)")
    parser.add_argument("--prompts", type=int, default=20, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", default="reports/drift/drift.json")
    args = parser.parse_args()

    base = load_model(args.base)
    prompts = [base.tokenizer.chat_ids(e.prompt) for e in load_prompts("gsm8k-eval", limit=args.prompts)]
    settings = dict(method="ar", max_new_tokens=args.max_new_tokens, eos_id=base.tokenizer.eos_token_id)
    texts = [(p, g.token_ids) for p, g in zip(prompts, Decoder(base.model, **settings).generate(prompts))]
    base_choices = [greedy_choices(base.model, p + g) for p, g in texts]
    report = {"machine": describe_machine(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "base_generation_tokens": [len(g) for _, g in texts], "models": {}}
    for path in args.models:
        row = drift(load_model(path).model, base_choices, texts, base.tokenizer.decode)
        report["models"][path] = row
        print(f"{path}: per-token mismatch {100 * row['per_token_mismatch']:.1f}%, identical {row['identical']}/"
              f"{len(texts)}, first divergence at token {row['first_divergence_median']:.0f} (median; "
              f"{sorted(row['first_divergence'])}), base top-2 margin there {row['base_margin_at_divergence_median']:.2f}")
        for e in row["examples"][:4]:
            print(f"    ...{e['after']!r}: base {e['base']!r}, model {e['model']!r}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
