"""CLLM loss terms as pure functions of logits and masks (all arithmetic in fp32).

Consistency: the student's next-token distributions q (the model on prefix + a trajectory state)
are pulled towards target distributions p (the same model on prefix + the fixed point, or the next
state), with the gradient stopped on the target side. Only the positions the mask weighs count:
from the first token where the student's state differs from the target state to the end of the
block (see `states.slot_weights`). A mask may carry weights: 1/count per kept position of a block
makes the loss a mean per block (Jacobi Forcing's normalisation) once divided by the block count.

AR: next-token cross-entropy with optional label smoothing (eps = 0: plain cross-entropy, as
Jacobi Forcing), exactly as transformers' `LabelSmoother` (which the reference trainer calls with
eps = 0.1): (1 - eps) * mean NLL + eps * mean over tokens and vocabulary of -log q.

Distilled AR (loss.ar_target=base): `consistency_loss` with the frozen base model's logits as the
target and the AR weights as the mask, i.e. the soft cross-entropy to the base at the AR positions.

Normalisation: each term is a sum over the selected positions divided by `denom` (by default the
number of selected positions in the arrays given). The train step passes the count over the whole
global batch, so that gradient accumulation over micro-batches equals one large batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DISTANCES = ("forward_kl", "reverse_kl", "js")


def token_distance(student_logits: jax.Array, target_logits: jax.Array, kind: str = "forward_kl") -> jax.Array:
    """Per-position distance between target p and student q over the last (vocabulary) axis.

    forward_kl: the reference's soft cross-entropy -sum p log q (KL(p||q) plus the target's entropy,
    a constant for the student: same gradient, and the value the reference logs).
    reverse_kl: KL(q||p) = sum q (log q - log p).   js: Jensen-Shannon with m = (p + q) / 2.
    """
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    log_p = jax.nn.log_softmax(jax.lax.stop_gradient(target_logits).astype(jnp.float32), axis=-1)
    if kind == "forward_kl":
        return -jnp.sum(jnp.exp(log_p) * log_q, axis=-1)
    if kind == "reverse_kl":
        return jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
    if kind == "js":
        log_m = jnp.logaddexp(log_p, log_q) - math.log(2.0)
        kl_pm = jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=-1)
        kl_qm = jnp.sum(jnp.exp(log_q) * (log_q - log_m), axis=-1)
        return 0.5 * (kl_pm + kl_qm)
    raise ValueError(f"unknown distance {kind!r} (expected one of {DISTANCES})")


def _normalise(total: jax.Array, weights: jax.Array, denom) -> jax.Array:
    count = jnp.sum(weights) if denom is None else denom
    return total / jnp.maximum(count, 1.0)


def consistency_loss(student_logits: jax.Array, target_logits: jax.Array, mask: jax.Array,
                     kind: str = "forward_kl", denom=None) -> jax.Array:
    """sum over masked positions of the distance, / denom (default: the number of masked positions).

    student_logits, target_logits: [..., M, V]; mask: [..., M] (1 = counts). All-zero mask: 0.
    """
    distance = token_distance(student_logits, target_logits, kind)
    mask = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, distance * mask, 0.0))
    return _normalise(total, mask, denom)


def ar_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, label_smoothing: float = 0.0,
            denom=None) -> jax.Array:
    """Label-smoothed next-token cross-entropy. logits [..., T, V] at the positions that predict
    `labels` [..., T] (already shifted); weights [..., T] (0 = padding)."""
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    weights = weights.astype(jnp.float32)
    nll = -jnp.take_along_axis(log_q, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    smooth = -jnp.mean(log_q, axis=-1)  # = sum over V / V, as LabelSmoother's / (N * V)
    nll_total = jnp.sum(jnp.where(weights > 0, nll * weights, 0.0))
    smooth_total = jnp.sum(jnp.where(weights > 0, smooth * weights, 0.0))
    eps = label_smoothing
    return _normalise((1.0 - eps) * nll_total + eps * smooth_total, weights, denom)
