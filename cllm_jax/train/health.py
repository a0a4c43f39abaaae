"""Training health: a run stops at the first step whose loss is not finite or whose model collapsed.

Cheap by design: the per-step check reads only the loss terms and gradient norm that the step
returns anyway (they are on the host for logging). Parameters are read only when a run stops, to
name a good checkpoint, and once before export.

Collapse: every gradient is zero and the AR loss equals log(vocab), the cross-entropy of a uniform
prediction (whatever the label smoothing). Such a model predicts the same flat distribution for
every token and can never learn again; `optim.lr=1e6` does it to SmolLM2 in one step.

A good checkpoint is one whose parameters are finite and whose next step had a healthy loss (the
metrics of step c + 1 are computed with the parameters checkpointed at step c). A run stops at its
first unhealthy step s, so checkpoints up to s - 2 passed the second test, and s - 1 failed it: it
holds the parameters that produced the failure.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# The cross-entropy term each objective reports (the consistency objective's AR term, the placeholder
# drafter's first draft position): a uniform prediction makes it log(vocab size).
CROSS_ENTROPY_TERMS = {"loss_ar": "AR loss", "loss_first_draft": "first-draft loss"}


def unhealthy(metrics: dict, vocab_size: int) -> tuple[str, str] | None:
    """(what happened, the figures that show it) for a step that returned `metrics`; None if healthy."""
    # the total first, then its terms and the gradient norm: the figures read in that order
    terms = {k: metrics[k] for k in sorted((k for k in metrics if k.startswith("loss") or k == "grad_norm"),
                                           key=lambda k: (k != "loss", k == "grad_norm", k))}
    if not all(math.isfinite(v) for v in terms.values()):
        return "diverged", ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
    uniform = math.log(vocab_size)
    for key, name in CROSS_ENTROPY_TERMS.items():
        if key in terms and terms["grad_norm"] == 0.0 and abs(terms[key] - uniform) <= 1e-4 * uniform:
            return ("collapsed to a uniform prediction",
                    f"gradient norm 0, {name} {terms[key]:.4f} = log(vocab size {vocab_size})")
    return None


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (one reduction on the devices)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def last_good_checkpoint(checkpointer, abstract_state, failed_step: int) -> tuple[int | None, str]:
    """(step, why) of the newest good checkpoint before a run that failed at `failed_step`.

    `why` explains a None: what the newest checkpoint holds, or that there is none.
    """
    checkpointer.wait()
    steps = sorted(checkpointer.all_steps(), reverse=True)
    reasons = []
    for step in steps:
        if step >= failed_step - 1:  # its parameters produced the failing step (or came after it)
            reasons.append(f"step {step} " + ("comes after it" if step >= failed_step
                                              else "holds the parameters that produced it"))
            continue
        try:
            state, _ = checkpointer.restore(abstract_state, step)
        except Exception:  # noqa: BLE001 - a checkpoint that does not restore is not good
            reasons.append(f"step {step} does not restore")
            continue
        if bool(all_finite(state.params)):
            return step, ""
        reasons.append(f"step {step} holds non-finite parameters")
    return None, "; ".join(reasons) or "none was written before it"
