"""The token-choice rule shared by autoregressive and Jacobi decoding.

A token is chosen as a deterministic function of (logits, row seed, position of the new token):
greedy argmax, or argmax of filtered logits / temperature plus Gumbel noise drawn from a key folded
from the row's seed and the position. Because the noise depends on the position and not on the order
of forward passes, the Jacobi fixed point under sampling equals autoregressive sampling with the
same seeds, token for token, exactly as in the greedy case. It also makes batched sampling give
every row the same tokens as batch 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cllm_jax.decode.options import Sampling


def _filter(logits: jax.Array, sampling: Sampling) -> jax.Array:
    neg = jnp.finfo(logits.dtype).min
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def choose_tokens(logits: jax.Array, positions: jax.Array, row_seeds: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B, T, V] -> token ids [B, T]; positions [B, T] are the positions the tokens will take."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    base = jax.random.key(sampling.seed)

    def noise(seed, position):
        return jax.random.gumbel(jax.random.fold_in(jax.random.fold_in(base, seed), position), logits.shape[-1:])

    gumbel = jax.vmap(jax.vmap(noise, in_axes=(None, 0)), in_axes=(0, 0))(row_seeds, positions)
    scores = _filter(logits.astype(jnp.float32) / sampling.temperature, sampling) + gumbel
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)
