"""Who verifies and who drafts in a Jacobi pass.

A Jacobi window's first token is final; one pass predicts, at every slot, the token after it. The
verifier's predictions decide how many of the window's tokens are accepted and give the exact token
after them; the drafter's predictions become the next guesses for the slots after that. Output is
whatever the verifier would generate autoregressively, whatever the drafter proposes.

- "self": plain Jacobi decoding. The model is both; one row per prompt.
- "rows": lossless drafting with an adapter (cllm_jax/model/adapter.py). Each prompt has two rows
  over the same window, the base model's (adapter gate 0, the verifier) and the adapted model's
  (gate 1, the drafter), each with its own K/V for the committed text. One forward pass over the 2B
  rows reads the base weights once; the adapter's low-rank delta is added to its rows only.
- "gated": lossless drafting in one row per prompt of 2W tokens: the window as the base model sees it
  (the verifier; its K/V are the cache's), then the same window again with the adapter on (the
  drafter) at the same positions. The drafter's tokens attend to the committed text's base K/V and
  to each other causally, never to the verifier's copy; their own K/V go to W scratch slots past
  the end of the cache, so they never overwrite the base's. This is the layout a gated adapter
  (trained with the adapter only on its noisy blocks, over the base's view of the text) drafts in,
  and it keeps one cache per prompt instead of two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cllm_jax.decode.prefill import prefill
from cllm_jax.decode.sampling import Sampling, choose_tokens
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM

LAYOUTS = ("self", "rows", "gated")
LOSSLESS_LAYOUTS = ("rows", "gated")


def cache_shape(layout: str, batch: int, slots: int, width: int) -> tuple[int, int]:
    """(rows, slots) of the KV cache for `batch` prompts, `slots` positions and windows of `width`."""
    if layout == "rows":
        return 2 * batch, slots
    if layout == "gated":
        return batch, slots + width  # the drafter's scratch slots
    return batch, slots


def _row_gate(batch: int, time: int) -> jax.Array:
    """[2B, T]: 0 for the base rows (first B), 1 for the adapter rows."""
    return jnp.repeat(jnp.array([0.0, 1.0]), batch)[:, None] * jnp.ones((1, time))


def start(model: CausalLM, layout: str, prompt_tokens: jax.Array, prompt_lengths: jax.Array, row_seeds: jax.Array,
          cache: KVCache, sampling: Sampling) -> tuple[jax.Array, KVCache]:
    """Prefill the prompts into the cache of `layout`; the first token [B] is the verifier's."""
    if layout == "self":
        return prefill(model, prompt_tokens, prompt_lengths, row_seeds, cache, sampling)
    batch, time = prompt_tokens.shape
    if layout == "rows":
        twice = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
        first, cache = prefill(model, twice(prompt_tokens), twice(prompt_lengths), twice(row_seeds), cache,
                               sampling, adapter_gate=_row_gate(batch, time))
        return first[:batch], cache
    # gated: the drafter reads the base's K/V of the text, so only the base sees the prompt
    return prefill(model, prompt_tokens, prompt_lengths, row_seeds, cache, sampling,
                   adapter_gate=jnp.zeros((batch, time)))


def predict(model: CausalLM, layout: str, window: jax.Array, positions: jax.Array, row_seeds: jax.Array, cache: KVCache,
            sampling: Sampling) -> tuple[jax.Array, jax.Array, KVCache]:
    """(verifier's predictions, drafter's predictions, cache) for a window [B, W] at `positions`."""
    batch, width = window.shape
    if layout == "self":
        hidden, cache = model(window, positions, cache)
        predicted = choose_tokens(model.logits(hidden), positions + 1, row_seeds, sampling)
        return predicted, predicted, cache
    if layout == "rows":
        twice = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
        hidden, cache = model(twice(window), twice(positions), cache, adapter_gate=_row_gate(batch, width))
        predicted = choose_tokens(model.logits(hidden), twice(positions) + 1, twice(row_seeds), sampling)
        return predicted[:batch], predicted[batch:], cache
    scratch = cache.length - width  # the drafter's K/V live in slots scratch .. scratch + W - 1
    slot = jnp.arange(cache.length)[None, None, :]
    verify_sees = (slot <= positions[:, :, None]) & (slot < scratch)
    start_at = positions[:, :1, None]  # the window's first position: the committed text ends before it
    own = scratch + jnp.arange(width)[None, :, None]
    draft_sees = (slot < start_at) | ((slot >= scratch) & (slot <= own))
    mask = jnp.concatenate([verify_sees, draft_sees], axis=1)  # [B, 2W, S + W]
    slots = jnp.concatenate([positions, jnp.broadcast_to(scratch + jnp.arange(width), (batch, width))], axis=1)
    gate = jnp.concatenate([jnp.zeros((batch, width)), jnp.ones((batch, width))], axis=1)
    both = jnp.concatenate([positions, positions], axis=1)
    hidden, cache = model(jnp.concatenate([window, window], axis=1), both, cache, mask=mask, slots=slots,
                          adapter_gate=gate)
    predicted = choose_tokens(model.logits(hidden), both + 1, row_seeds, sampling)
    return predicted[:, :width], predicted[:, width:], cache
