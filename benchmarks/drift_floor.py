"""The floor under issue 10's drift targets: how far does the base model drift when its weights barely move?

    python benchmarks/drift_floor.py [--prompts 50] [--noise 1e-3 6e-3 3e-2] [--models RUN_OR_EXPORT ...]

No training here. The base model's weights are changed in ways that cannot have learnt anything:
  bf16 rounding   every weight rounded to bfloat16, computed in fp32 (each weight off by <= 2^-8 of itself)
  noise EPS       every weight w -> w * (1 + EPS * N(0, 1)), one fixed seed
and, with --models, trained CLLMs beside them. Each decodes the evaluation's held-out GSM8K problems
greedily with our AR (the output every exact Jacobi method reproduces), and is scored as the
evaluation scores a method against the base model's AR: same final answer, identical generation,
base_nll_ratio. Beside each, the relative weight change ||w' - w|| / ||w|| over all parameters.

If rounding the weights to bf16 already parts answers, no fine-tune that moves the weights
further (the CLLMs here moved theirs 3 to 30 times as far) can keep them, whatever its loss. Writes
reports/drift/floor.json and floor.png (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from cllm_jax.data.prompts import load_prompts
from cllm_jax.evaluate.evaluation import EvalSettings, decode_run, score, with_base_nll
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.evaluate.plots import plot_against_weight_change
from cllm_jax.weights.load import load_model


def params(model) -> list[jax.Array]:
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def relative_change(model, base) -> float:
    """||w' - w|| / ||w|| over every parameter of two models of one shape and layout."""
    pairs = list(zip(params(model), params(base), strict=True))
    diff = sum(float(jnp.sum(jnp.square(a.astype(jnp.float32) - b))) for a, b in pairs)
    return float(np.sqrt(diff / sum(float(jnp.sum(jnp.square(b))) for _, b in pairs)))


def perturbed(base_path, kind: str, eps: float = 0.0, seed: int = 0):
    """A fresh copy of the base model with its weights changed in place (bf16 rounding or noise)."""
    model = load_model(base_path).model
    state = nnx.state(model, nnx.Param)
    if kind == "bf16":
        changed = jax.tree.map(lambda w: w.astype(jnp.bfloat16).astype(w.dtype), state)
    else:
        leaves, tree = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        changed = jax.tree.unflatten(tree, [w * (1 + eps * jax.random.normal(k, w.shape, w.dtype))
                                            for w, k in zip(leaves, keys)])  # fmt: skip
    nnx.update(model, changed)
    return model


def _run_name(path: str) -> str:
    """runs/NAME/train/export, runs/NAME/train or runs/NAME -> NAME (the label in tables and the plot)."""
    parts = [p for p in Path(path).parts if p not in ("train", "export")]
    return parts[-1] if parts else path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="the base model (default: the built-in SmolLM2)")
    parser.add_argument("--prompts", type=int, default=50, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--noise", type=float, nargs="*", default=[1e-3, 6e-3, 3e-2], help="relative noise scales")
    parser.add_argument("--models", nargs="*", default=[], help="trained CLLMs (runs or exports) to place beside")
    parser.add_argument("--out", default="reports/drift/floor.json")
    args = parser.parse_args()

    base = load_model(args.base)
    examples = load_prompts("gsm8k-eval", limit=args.prompts)
    prompts = [base.tokenizer.chat_ids(e.prompt) for e in examples]
    settings = EvalSettings(max_new_tokens=args.max_new_tokens)
    variants = [("base model", lambda: base.model), ("bf16 rounding", lambda: perturbed(base.path, "bf16"))]
    variants += [(f"noise {eps:g}", lambda eps=eps: perturbed(base.path, "noise", eps)) for eps in args.noise]
    variants += [(_run_name(path), lambda path=path: load_model(path).model) for path in args.models]

    runs, changes = [], {}
    for name, make in tqdm(variants, desc="models", unit="model"):  # about 4 min each on the 2-core CPU
        model = make()
        changes[name] = relative_change(model, base.model)
        tqdm.write(f"{name}: relative weight change {changes[name]:.2e}; decoding {len(prompts)} prompts")
        runs.append(decode_run(name, dataclasses.replace(base, model=model), prompts, "ar", settings))
    table = score(with_base_nll(runs, base, prompts), examples, base.tokenizer.decode)
    rows = {}
    for name, figures in table.items():
        rows[name] = {"relative_weight_change": changes[name], "final_answer_agreement":
                      figures["agreement"]["final_answer"], "identical_generation": figures["agreement"]["generation"],
                      "base_nll_ratio": figures["base_nll_ratio"], "accuracy": figures["accuracy"]}  # fmt: skip
        r = rows[name]
        print(f"{name:>24}: |dw|/|w| {r['relative_weight_change']:.1e}  same answer "
              f"{r['final_answer_agreement']:.0%}  identical {r['identical_generation']:.0%}  "
              f"base_nll_ratio {r['base_nll_ratio']:.3f}  accuracy {r['accuracy']:.0%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": describe_machine(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "decoding": "our AR, greedy, fp32 compute", "rows": rows}  # fmt: skip
    out.write_text(json.dumps(report, indent=1) + "\n")
    plot_against_weight_change({k: v for k, v in rows.items() if v["relative_weight_change"] > 0},
                               out.with_suffix(".png"))  # the base (no change) has no place on a log axis
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
