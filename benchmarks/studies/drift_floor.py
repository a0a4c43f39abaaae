"""The floor under the drift targets: how far does the base model drift when its weights barely move?

    python benchmarks/studies/drift_floor.py [--prompts 50] [--noise 1e-3 6e-3 3e-2] [--models RUN_OR_EXPORT ...]

No training here. The base model's weights are changed in ways that cannot have learnt anything:
  bf16 rounding   every weight rounded to bfloat16, computed in fp32 (each weight off by <= 2^-8 of itself)
  noise EPS       every weight w -> w * (1 + EPS * N(0, 1)), one fixed seed
and, with --models, trained CLLMs beside them. Each decodes the evaluation's held-out GSM8K problems
(the first N, of any length) greedily with our AR, fp32 compute (the output every exact Jacobi method
reproduces), and is scored as the evaluation scores a method against the base model's AR: same
final answer, identical generation, base_nll_ratio. Beside each, the relative weight change
||w' - w|| / ||w|| over all parameters.

If rounding the weights to bf16 already parts answers, no fine-tune that moves the weights
further (the CLLMs here moved theirs 3 to 30 times as far) can keep them, whatever its loss. Writes
reports/drift/floor.json and floor.png (or --out, and the .png beside it).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cllm_jax.evaluate.evaluation import EvalSettings, Row, decode_run, score, with_base_nll  # noqa: E402
from cllm_jax.evaluate.tasks import load_task  # noqa: E402
from cllm_jax.weights.load import load_model  # noqa: E402


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


def plot_against_weight_change(rows: list[dict], path: str | Path) -> None:
    """Agreement with the base model and base_nll_ratio against the relative weight change (log x),
    one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("final_answer_agreement", "same final answer as the base"), ("base_nll_ratio", "base_nll_ratio")]
    for ax, (key, title) in zip(axes, panels):
        for row in rows:
            ax.scatter(row["relative_weight_change"], row[key], color="#3b75af")
            ax.annotate(row["model"], (row["relative_weight_change"], row[key]), xytext=(4, 4),
                        textcoords="offset points", fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("relative weight change ||w' - w|| / ||w||")
        ax.set_title(title)
    axes[0].axhline(0.5, color="black", linewidth=0.6, linestyle="--")  # the drift study's thresholds
    axes[1].axhline(1.10, color="black", linewidth=0.6, linestyle="--")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = harness.parser(__doc__, out="reports/drift/floor.json")
    parser.add_argument("--base", help="the base model (default: the built-in SmolLM2)")
    parser.add_argument("--prompts", type=int, default=50, help="the first N held-out GSM8K problems")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--noise", type=float, nargs="*", default=[1e-3, 6e-3, 3e-2], help="relative noise scales")
    parser.add_argument("--models", nargs="*", default=[], help="trained CLLMs (runs or exports) to place beside")
    args = parser.parse_args()

    base = load_model(args.base)
    task = load_task("gsm8k", None, args.prompts, base.tokenizer)  # the evaluation's problems and judge
    settings = EvalSettings(max_new_tokens=args.max_new_tokens)
    variants = [("base model", lambda: base.model), ("bf16 rounding", lambda: perturbed(base.path, "bf16"))]
    variants += [(f"noise {eps:g}", lambda eps=eps: perturbed(base.path, "noise", eps)) for eps in args.noise]
    variants += [(_run_name(path), lambda path=path: load_model(path).model) for path in args.models]

    runs, changes = [], {}
    for name, make in tqdm(variants, desc="models", unit="model"):  # about 4 min each on the 2-core CPU
        model = make()
        changes[name] = relative_change(model, base.model)
        tqdm.write(f"{name}: relative weight change {changes[name]:.2e}; decoding {len(task.prompts)} prompts")
        # our AR on these weights, scored as the base model's: the first run is the reference
        runs.append(decode_run(name, "base", dataclasses.replace(base, model=model), task.prompts, Row(method="ar"),
                               settings, None))
    runs = with_base_nll(runs, base, task.prompts)
    judged = task.judge(runs, base.tokenizer.decode)
    rows = [{"model": name, "relative_weight_change": changes[name],
             "final_answer_agreement": figures["agreement"]["final_answer"],
             "identical_generation": figures["agreement"]["generation"],
             "base_nll_ratio": figures["base_nll_ratio"], "accuracy": figures["accuracy"]}
            for name, figures in score(runs, judged.correct, judged.final_answer).items()]  # fmt: skip
    print(harness.table(rows, [("model", "model", ""), ("|dw|/|w|", "relative_weight_change", ".1e"),
                               ("same answer", "final_answer_agreement", ".0%"),
                               ("identical", "identical_generation", ".0%"), ("base_nll_ratio", "base_nll_ratio", ".3f"),
                               ("accuracy", "accuracy", ".0%")]))
    out = harness.write(args.out, rows, args)
    # the base (no change) has no place on a log axis
    plot_against_weight_change([r for r in rows if r["relative_weight_change"] > 0], out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
