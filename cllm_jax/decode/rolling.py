"""Rolling Jacobi decoding: a window of n tokens slides forward by what each pass settles.

After every pass the longest prefix of the window whose tokens equal the model's own prediction
from the tokens before them is final (always at least the first token). Its KV entries are already
right, so the cache pointer advances by that many tokens; the window continues with the shifted
predictions and its tail is refilled with fresh guesses. No pass re-runs settled tokens, and the
output is exactly what (greedy or seeded) autoregressive decoding gives.

Token metrics: of the tokens a pass accepts beyond the first, a token whose value came from the
pass just before is fast-forwarded, one that had held its value for longer is stationary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cllm_jax.decode.autoregressive import DecodeOutput
from cllm_jax.decode.jacobi import JacobiOptions, Progress, begin, commit, guess_block, refill_by_lookup
from cllm_jax.decode.prefill import truncate_at_eos
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.llama import Llama
from cllm_jax.decode.sampling import choose_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: KVCache
    progress: Progress
    window: jax.Array  # [B, n]; window[:, 0] is final
    set_at: jax.Array  # [B, n] the step that gave each window token its current value
    step: jax.Array


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("cache",))
def generate_rolling_jacobi(
    model: Llama,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    row_seeds: jax.Array,
    cache: KVCache,
    key: jax.Array,
    options: JacobiOptions,
) -> DecodeOutput:
    n, batch = options.block_size, prompt_tokens.shape[0]
    vocab = model.config.vocab_size
    offsets = jnp.arange(n, dtype=jnp.int32)
    cache, progress, window = begin(model, prompt_tokens, prompt_lengths, row_seeds, cache, key, options)
    # Guessed tokens are marked -1: a right guess that a pass accepts counts as stationary, not fast-forwarded.
    state = _State(cache, progress, window, jnp.full((batch, n), -1, jnp.int32), jnp.int32(0))

    def iterate(state: _State) -> _State:
        p, window, step = state.progress, state.window, state.step + 1
        active = ~p.done
        positions = (prompt_lengths + p.lengths)[:, None] + offsets
        hidden, cache = model(window, positions, state.cache)
        predicted = choose_tokens(model.logits(hidden), positions + 1, row_seeds, options.sampling)
        agrees = window[:, 1:] == predicted[:, :-1]
        accepted = 1 + jnp.cumprod(agrees, axis=1).sum(axis=1)  # [B] in 1..n

        keep, _ = truncate_at_eos(window, jnp.minimum(accepted, options.max_new_tokens - p.lengths), options.eos_id)
        beyond_first = (offsets[None, :] > 0) & (offsets[None, :] < keep[:, None])
        fresh_value = state.set_at == step - 1
        p = dataclasses.replace(
            p,
            passes=p.passes + active,
            fast_forwarded=p.fast_forwarded + jnp.where(active, (beyond_first & fresh_value).sum(1), 0),
            stationary=p.stationary + jnp.where(active, (beyond_first & ~fresh_value).sum(1), 0),
        )
        p = commit(p, window, accepted, active, options)
        # Slide: the new window starts with the prediction after the accepted prefix (final), then
        # the remaining predictions, then fresh guesses for the k - 1 slots freed at the end.
        source = accepted[:, None] - 1 + offsets
        shifted = jnp.take_along_axis(predicted, jnp.minimum(source, n - 1), axis=1)
        guesses = guess_block(key, row_seeds, shifted[:, 0], prompt_tokens, prompt_lengths, p, options, vocab)
        from_prediction = source < n
        new_window = jnp.where(from_prediction, shifted, guesses)
        new_window = refill_by_lookup(new_window, prompt_tokens, prompt_lengths, p, options)
        # A slot keeps its age when the token at that absolute position did not change.
        old_index = source + 1
        old_token = jnp.take_along_axis(window, jnp.minimum(old_index, n - 1), axis=1)
        old_set_at = jnp.take_along_axis(state.set_at, jnp.minimum(old_index, n - 1), axis=1)
        unchanged = from_prediction & (old_index < n) & (old_token == new_window)
        set_at = jnp.where(unchanged, old_set_at, jnp.where(from_prediction, step, -1))
        p = commit(p, new_window[:, :1], jnp.ones((batch,), jnp.int32), active, options, only_if_final=True)
        return _State(
            cache,
            p,
            jnp.where(active[:, None], new_window, window),
            jnp.where(active[:, None], set_at, state.set_at),
            step,
        )

    # Every pass settles at least one token, so the budget bounds the loop.
    max_steps = options.max_new_tokens + 1
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.progress.done) & (s.step < max_steps), iterate, state)
    p = state.progress
    # Blocks of n generated tokens (after the first), so passes per block compares with fixed-block Jacobi.
    blocks = -(-(p.lengths - 1) // n)
    return DecodeOutput(
        p.generated[:, : options.max_new_tokens], p.lengths, p.passes, blocks, p.fast_forwarded, p.stationary,
        state.cache,
    )  # fmt: skip
