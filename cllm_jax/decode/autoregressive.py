"""Autoregressive decoding: prefill, then one token per forward pass in a `lax.while_loop`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cllm_jax.decode.options import DecodeOptions
from cllm_jax.decode.prefill import prefill
from cllm_jax.decode.sampling import choose_tokens
from cllm_jax.decode.state import DecodeOutput
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class AROptions(DecodeOptions):
    """Autoregressive decoding takes only what every method takes."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _ARState:
    cache: KVCache
    tokens: jax.Array
    lengths: jax.Array
    done: jax.Array
    passes: jax.Array


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("cache",))
def generate_autoregressive(
    model: CausalLM,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    row_seeds: jax.Array,
    cache: KVCache,
    key: jax.Array,
    options: AROptions,
) -> DecodeOutput:
    del key  # no guesses to draw: the signature every method shares
    batch = prompt_tokens.shape[0]
    budget = options.max_new_tokens
    first, cache = prefill(model, prompt_tokens, prompt_lengths, row_seeds, cache, options.sampling)
    tokens = jnp.zeros((batch, budget), jnp.int32).at[:, 0].set(first)
    done = jnp.full((batch,), budget <= 1)
    if options.eos_id is not None:
        done = done | (first == options.eos_id)
    state = _ARState(cache, tokens, jnp.ones((batch,), jnp.int32), done, jnp.ones((batch,), jnp.int32))

    def step(state: _ARState) -> _ARState:
        rows = jnp.arange(batch)
        last = state.tokens[rows, state.lengths - 1]
        position = prompt_lengths + state.lengths - 1
        hidden, cache = model(last[:, None], position[:, None], state.cache)
        nxt = choose_tokens(model.logits(hidden), position[:, None] + 1, row_seeds, options.sampling)[:, 0]
        active = ~state.done
        tokens = state.tokens.at[rows, jnp.minimum(state.lengths, budget - 1)].set(
            jnp.where(active, nxt, state.tokens[rows, jnp.minimum(state.lengths, budget - 1)])
        )
        lengths = state.lengths + active
        done = state.done | (lengths >= budget)
        if options.eos_id is not None:
            done = done | (active & (nxt == options.eos_id))
        return _ARState(cache, tokens, lengths, done, state.passes + active)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), step, state)
    zeros = jnp.zeros((batch,), jnp.int32)
    return DecodeOutput(tokens=state.tokens, lengths=state.lengths, forward_passes=state.passes, blocks=zeros,
                        fast_forwarded=zeros, stationary=zeros, cache=state.cache)
