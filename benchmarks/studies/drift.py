"""Where a CLLM's greedy text leaves the base model's: teacher-forced on the base's own greedy generations.

    python benchmarks/studies/drift.py runs/smollm2_gsm8k_jf/train/export [MORE_MODELS ...] [--prompts 20]

The base model (the built-in SmolLM2 unless --base) decodes the first N held-out GSM8K problems
(the evaluation's, whatever their length) greedily; each model then reads prompt + that text in one
forward pass. Per model: the share of generated positions whose argmax differs from the base's
(per-token mismatch), the first such position per prompt (where exact decoding of the CLLM starts
writing other text), the base's top-2 logit margin there, and the tokens both pick. Exact generation
agreement over L tokens needs a mismatch rate well under 1/L; the evaluation's "same final answer"
follows from it on a model whose answers depend on the whole text. Writes reports/drift/drift.json
(or --out).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cllm_jax.data.sources import load_prompts  # noqa: E402
from cllm_jax.decode.engine import Decoder  # noqa: E402
from cllm_jax.decode.prefill import bucket_length  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402


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
    parser = harness.parser(__doc__, out="reports/drift/drift.json")
    parser.add_argument("models", nargs="+", help="CLLMs (training runs or exports)")
    parser.add_argument("--base", help="the base model (default: the built-in SmolLM2)")
    parser.add_argument("--prompts", type=int, default=20, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()

    base = load_model(args.base)
    # The evaluation's first N problems, of any length (not harness.gsm8k_prompts' one length bucket):
    # what the evaluation's agreement figures were measured on.
    prompts = [base.tokenizer.chat_ids(e.prompt) for e in load_prompts("gsm8k-eval", limit=args.prompts)]
    decoder = Decoder(base.model, "ar", max_new_tokens=args.max_new_tokens, eos_id=base.tokenizer.eos_token_id)
    texts = [(p, g.token_ids) for p, g in zip(prompts, decoder.generate(prompts))]
    base_choices = [greedy_choices(base.model, p + g) for p, g in texts]
    rows = []
    for path in args.models:
        rows.append({"model": path, **drift(load_model(path).model, base_choices, texts, base.tokenizer.decode)})
        for e in rows[-1]["examples"][:4]:
            print(f"{path}: ...{e['after']!r}: base {e['base']!r}, model {e['model']!r}")
    for row in rows:
        row["identical_of"] = f"{row['identical']}/{len(texts)}"
    print(harness.table(rows, [("model", "model", ""), ("per-token mismatch", "per_token_mismatch", ".1%"),
                               ("identical", "identical_of", ""),
                               ("first divergence (median token)", "first_divergence_median", ".0f"),
                               ("base top-2 margin there (median)", "base_margin_at_divergence_median", ".2f")]))
    harness.write(args.out, {"prompts": len(prompts), "base_generation_tokens": [len(g) for _, g in texts],
                             "models": rows}, args)


if __name__ == "__main__":
    main()
