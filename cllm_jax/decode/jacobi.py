"""Fixed-block Jacobi decoding as one jitted function.

One `lax.while_loop` step is one forward pass of every row's n-token block. Each row iterates its
own block: when a row's block stops changing it commits the block (whose KV entries, computed from
the converged tokens, are already in the cache), seeds the next block with the argmax at the last
position, and goes on, while other rows keep iterating. So the loop over blocks and the loop over
iterations are one loop, and no row waits for another.

Token metrics, per block, from `last_change[i]` (the iteration that gave position i its final value)
and its running maximum `u[i]` (the iteration from which positions 0..i are all final):
  - fast-forwarded: i joined the final prefix in the same iteration as the token before it, and
    changed in that iteration (a token AR would not have had yet, predicted right in one pass);
  - stationary: i had its final value before the prefix reached it (it was right while a token
    before it was wrong) and never changed again: last_change[i] < u[i].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cllm_jax.decode.guess import next_guess
from cllm_jax.decode.options import JacobiOptions, option
from cllm_jax.decode.prefill import prefill
from cllm_jax.decode.sampling import choose_tokens
from cllm_jax.decode.state import DecodeOutput, Int, Progress, Text, commit, start_progress
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM


@dataclasses.dataclass(frozen=True, kw_only=True)
class FixedBlockOptions(JacobiOptions):
    record: bool = option(False, "keep every state of every block (trajectory collection)")

    @property
    def max_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block_size) + 1


def token_metrics(last_change: jax.Array, keep: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fast-forwarded and stationary counts per row over the first `keep` positions (module docstring)."""
    final_from = jax.lax.cummax(last_change, axis=1)
    before = jnp.pad(final_from[:, :-1], ((0, 0), (1, 0)))
    counted = (jnp.arange(last_change.shape[1])[None, :] < keep[:, None]) & (jnp.arange(last_change.shape[1]) > 0)
    fast = counted & (final_from > 0) & (last_change == final_from) & (before == final_from)
    still = counted & (last_change < final_from)
    return fast.sum(axis=1), still.sum(axis=1)


def begin(model, prompt_tokens, prompt_lengths, row_seeds, cache, key, options: JacobiOptions, room: int):
    """Prefill, the first token, and the first block of guesses: (cache, progress, block)."""
    first, cache = prefill(model, prompt_tokens, prompt_lengths, row_seeds, cache, options.sampling)
    progress = start_progress(first, options, room)
    vocab = model.config.vocab_size
    text = Text.of(prompt_tokens, prompt_lengths, progress)
    return cache, progress, next_guess(key, row_seeds, first, text, options=options, vocab=vocab)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: KVCache  # [L, B, S, KV, D]
    progress: Progress
    block: Int["B n"]  # the current state of each row's block; block[:, 0] is final
    iteration: Int["B"]  # iterations spent on the current block
    last_change: Int["B n"]  # the iteration that last changed each slot
    step: Int[""]
    trajectory: Int["B max_blocks n+1 n"] | None  # recording only: every state of every block
    trajectory_states: Int["B max_blocks"] | None  # states recorded per block


def _record(state_trajectory, states, block, progress: Progress, index, rows):
    batch = block.shape[0]
    b = jnp.arange(batch)
    slot = jnp.minimum(progress.blocks, state_trajectory.shape[1] - 1)
    trajectory = state_trajectory.at[b, slot, index].set(
        jnp.where(rows[:, None], block, state_trajectory[b, slot, index])
    )
    states = states.at[b, slot].set(jnp.where(rows, index + 1, states[b, slot]))
    return trajectory, states


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("cache",))
def generate_jacobi(
    model: CausalLM,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    row_seeds: jax.Array,
    cache: KVCache,
    key: jax.Array,
    options: FixedBlockOptions,
) -> DecodeOutput:
    n, batch = options.block_size, prompt_tokens.shape[0]
    vocab = model.config.vocab_size
    offsets = jnp.arange(n, dtype=jnp.int32)
    cache, progress, block = begin(model, prompt_tokens, prompt_lengths, row_seeds, cache, key, options, n)
    trajectory = states = None
    if options.record:
        trajectory = jnp.zeros((batch, options.max_blocks, n + 1, n), jnp.int32)
        states = jnp.zeros((batch, options.max_blocks), jnp.int32)
        trajectory, states = _record(trajectory, states, block, progress, 0, ~progress.done)
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _State(cache, progress, block, zeros, jnp.zeros((batch, n), jnp.int32), 0, trajectory, states)

    def iterate(state: _State) -> _State:
        p = state.progress
        active = ~p.done
        positions = (prompt_lengths + p.lengths)[:, None] + offsets
        hidden, cache = model(state.block, positions, state.cache)
        predicted = choose_tokens(model.logits(hidden), positions + 1, row_seeds, options.sampling)
        # Shifted update: position i takes the prediction made at position i - 1; position 0 is final.
        new_block = jnp.concatenate([state.block[:, :1], predicted[:, :-1]], axis=1)
        iteration = state.iteration + 1
        changed = new_block != state.block
        last_change = jnp.where(changed, iteration[:, None], state.last_change)
        converged = active & ~changed.any(axis=1)
        trajectory, states = state.trajectory, state.trajectory_states
        if options.record:
            trajectory, states = _record(trajectory, states, new_block, p, iteration, active & ~converged)

        # Rows whose block converged: commit it, count its tokens, seed the next block.
        budget_left = options.max_new_tokens - p.lengths
        fast, still = token_metrics(last_change, jnp.minimum(n, budget_left))
        p = dataclasses.replace(
            p,
            passes=p.passes + active,
            blocks=p.blocks + converged,
            fast_forwarded=p.fast_forwarded + jnp.where(converged, fast, 0),
            stationary=p.stationary + jnp.where(converged, still, 0),
        )
        p = commit(p, state.block, jnp.full((batch,), n), converged, options)
        seed = predicted[:, -1]
        p = commit(p, seed[:, None], jnp.ones_like(zeros), converged, options, only_if_final=True)
        text = Text.of(prompt_tokens, prompt_lengths, p)
        fresh = next_guess(key, row_seeds, seed, text, options=options, vocab=vocab)
        if options.record:
            trajectory, states = _record(trajectory, states, fresh, p, 0, converged & ~p.done)
        return _State(
            cache,
            p,
            jnp.where(converged[:, None], fresh, new_block),
            jnp.where(converged, 0, iteration),
            jnp.where(converged[:, None], 0, last_change),
            state.step + 1,
            trajectory,
            states,
        )

    # Greedy Jacobi converges within n iterations per block; the bound only guards the loop.
    max_steps = options.max_blocks * (n + 1) + 1
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.progress.done) & (s.step < max_steps), iterate, state)
    p = state.progress
    return DecodeOutput(
        tokens=p.generated[:, : options.max_new_tokens], lengths=p.lengths, forward_passes=p.passes, blocks=p.blocks,
        fast_forwarded=p.fast_forwarded, stationary=p.stationary, cache=state.cache, trajectory=state.trajectory,
        trajectory_states=state.trajectory_states,
    )
