"""Rolling and multiblock Jacobi decoding: a window of K blocks slides over the text.

Rolling Jacobi (K = 1): after every pass the longest prefix of the window whose tokens equal the
predictions from the tokens before them is final (always at least the first token). Its KV
entries are already right, so the cache pointer advances by that many tokens; the window continues
with the shifted predictions and its tail is refilled with fresh guesses. No pass re-runs settled
tokens, and the output is exactly what (greedy or seeded) autoregressive decoding gives.

Multiblock Jacobi (Jacobi Forcing's inference, K > 1): generated positions are cut into blocks of
n. Up to K blocks are in flight; together they form one
draft that runs from the committed frontier f to the live end E, laid out at consecutive positions
after the committed prefix. Each iteration is ONE forward pass over a static K * n window at
positions f .. f + K*n - 1 (slots past E hold guesses and are ignored): slot == position in the KV
cache, and the commit pointer advances only by the accepted count, so entries written for
unverified tokens are overwritten by the next pass before anything reads them.

- The first block is verified: the longest prefix of the draft that equals the verifier's
  predictions is accepted (at least the first token). The prefix may run past the first block into
  the next one: that is the promotion of the next block, whose first token the pass has just checked
  against the exact prediction; its state (the rest of its tokens) is kept as the initial guess.
- Blocks behind the first iterate on unverified context: every draft token takes the drafter's
  prediction at the position before it (the Jacobi update over the whole draft), so a block behind
  the first converges given the draft of the blocks ahead and is re-verified when the acceptance
  reaches it.
- Alone, the first block rolls like rolling Jacobi: its window is always n tokens, refilled with
  guesses. Its accepted count is the number of tokens committed since its nominal start (a multiple
  of n generated tokens); when it reaches ceil(r * n) (or the block completes), a new block is
  spawned behind it, at the next multiple of n, and the first block stops rolling (it shrinks to its
  nominal end). A block behind the first counts as accepted the prefix of its tokens that agree with
  the predictions from the draft before them; when the newest block's count reaches ceil(r * n) and
  fewer than K blocks are in flight, the next block spawns behind it (one spawn per pass).

Who verifies and who drafts (cllm_jax/decode/drafting.py): in plain Jacobi decoding the model
itself; in lossless drafting the base model verifies and its adapter drafts, in the same pass.

Rejection recycling (P > 0, the model drafting itself): a per-row pool of the last P rejected
draft tails (n tokens from the first rejected token). Before each pass, every pool entry that
contains the exact next token (the draft's first token) gives a candidate: the entry's suffix from
that token's first occurrence, laid over the main draft. Candidates are verified in the same pass as
extra batch rows (their KV cache rows share the committed prefix); the row with the longest
acceptance wins (ties: the main draft), its KV entries are copied to the other rows, and the draft
continues from its predictions.

Metrics: every pass counts (the prefill included); of the tokens a pass accepts beyond the first,
one whose value came from the pass just before is fast-forwarded, any other (older, a right guess,
or recycled from the pool) is stationary.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from cllm_jax.decode import drafting
from cllm_jax.decode.guess import guess_block, guess_tokens, refill_by_lookup
from cllm_jax.decode.options import JacobiOptions, option
from cllm_jax.decode.state import (DecodeOutput, Progress, Text, accepted_prefix, commit, start_progress,
                                    truncate_at_eos)
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM


@dataclasses.dataclass(frozen=True)
class Window:
    """The static shape of a window loop, derived from a method's options."""

    blocks: int  # K: blocks in flight at most
    spawn_at: int  # spawn a block behind the newest when its accepted count reaches this
    recycle: int  # P: rejected tails kept for recycling (0: off)
    layout: str  # who drafts and verifies: drafting.LAYOUTS


@dataclasses.dataclass(frozen=True, kw_only=True)
class RollingOptions(JacobiOptions):
    recycle: int = option(0, "also verify candidates from the last P rejected tails, as extra rows (0: off)",
                          at_least=0)

    def window(self) -> Window:
        return Window(1, self.block_size, self.recycle, "self")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultiblockOptions(RollingOptions):
    blocks: int = option(2, "K: blocks in flight at most (1: rolling Jacobi)", at_least=1)
    spawn_ratio: float = option(0.85, "spawn a block behind the newest once ceil(r * n) of it are accepted",
                                above=0.0, at_most=1.0)

    def window(self) -> Window:
        return Window(self.blocks, math.ceil(self.spawn_ratio * self.block_size), self.recycle, "self")

    @property
    def lookahead(self) -> int:
        return self.blocks * self.block_size


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: KVCache  # [L, B * (1 + P), S, ...]: row b * (1 + P) is row b's main draft, the others its candidates
    progress: Progress
    window: jax.Array  # [B, K*n] the draft at positions f ..; window[:, 0] is final
    set_at: jax.Array  # [B, K*n] the step that gave each draft token its current value (-1: a guess)
    end: jax.Array  # [B] live end E, in generated tokens (the frontier f is progress.lengths)
    start: jax.Array  # [B] nominal start of the first block, used while it is alone
    pool: jax.Array  # [B, P, n] rejected tails, -1 where empty
    pool_next: jax.Array  # [B] ring index of the next pool entry to overwrite
    step: jax.Array


def _guesses(key, row_seeds, first, text: Text, *, options: JacobiOptions, blocks: int, vocab: int):
    """K * n draft slots of guesses; slot 0 is `first`, slots 1..n-1 are exactly rolling Jacobi's guesses."""
    o = options
    parts = [guess_block(key, row_seeds, first, text, options=o, vocab=vocab)]
    for j in range(1, blocks):
        parts.append(guess_tokens(key, row_seeds, text.lengths + j * o.block_size, strategy=o.init,
                                  shape=(first.shape[0], o.block_size), first=first, text=text, vocab_size=vocab,
                                  pad_id=o.pad_id))
    return jnp.concatenate(parts, axis=1)


def _candidates(window: jax.Array, pool: jax.Array) -> jax.Array:
    """[B, P, W] candidate drafts: each pool entry's suffix from the first occurrence of window[:, 0]."""
    n, width = pool.shape[2], window.shape[1]
    match = pool == window[:, None, :1]  # [B, P, n]
    found = match.any(axis=2)
    first = jnp.argmax(match, axis=2)  # [B, P]
    source = first[:, :, None] + jnp.arange(width)  # [B, P, W]
    taken = jnp.take_along_axis(pool, jnp.minimum(source, n - 1), axis=2)
    usable = found[:, :, None] & (source < n) & (taken >= 0)
    return jnp.where(usable, taken, window[:, None, :])


def _share_winner(cache: KVCache, winner_rows: jax.Array, frontier: jax.Array, group: int, width: int) -> KVCache:
    """Copy the winning row's KV entries at the window's slots into every row of its group.

    After this every row of a group holds the same (correct) entries up to the new frontier; slots
    beyond it are rewritten by the next pass.
    """
    batch = frontier.shape[0]
    slots = frontier[:, None] + jnp.arange(width)  # [B, W]
    rows = jnp.arange(batch * group).reshape(batch, group)

    def share(buffer):  # one layer: [rows, length, kv_heads, head_dim]
        src = buffer.at[winner_rows[:, None], slots].get(mode="clip")  # [B, W, KV, D]
        return buffer.at[rows[:, :, None], slots[:, None, :]].set(src[:, None], mode="drop")

    return cache.map_layers(share)  # either layer layout (stacked for scan, per layer for the loop)


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("cache",))
def generate_window(
    model: CausalLM,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    row_seeds: jax.Array,
    cache: KVCache,
    key: jax.Array,
    options: JacobiOptions,
) -> DecodeOutput:
    """Rolling, multiblock or lossless Jacobi decoding: `options.window()` says which."""
    o, shape = options, options.window()
    n, batch, recycle, layout = o.block_size, prompt_tokens.shape[0], shape.recycle, shape.layout
    width = shape.blocks * n
    group = 1 + recycle
    vocab = model.config.vocab_size
    offsets = jnp.arange(width, dtype=jnp.int32)
    first, cache = drafting.start(model, layout, prompt_tokens, prompt_lengths, row_seeds, cache, o.sampling)
    # Room for a whole window past the budget (commit writes the window, then counts what it keeps).
    progress = start_progress(first, o, width)
    text = Text.of(prompt_tokens, prompt_lengths, progress)
    window = _guesses(key, row_seeds, first, text, options=o, blocks=shape.blocks, vocab=vocab)
    window = refill_by_lookup(window, text, options=o)
    if recycle:
        # One cache row per candidate: each shares the committed prefix (copied here once, then kept in step).
        cache = cache.map_layers(lambda layer: jnp.repeat(layer, group, axis=0))
    zeros = jnp.zeros((batch,), jnp.int32)
    state = _State(
        cache, progress, window, jnp.full((batch, width), -1, jnp.int32), progress.lengths + n, zeros,
        jnp.full((batch, max(recycle, 1), n), -1, jnp.int32), zeros, jnp.int32(0),
    )  # fmt: skip
    group_seeds = jnp.repeat(row_seeds, group)

    def iterate(state: _State) -> _State:
        p, window, step = state.progress, state.window, state.step + 1
        active = ~p.done
        live = state.end - p.lengths  # [B] in 1..K*n
        positions = (prompt_lengths + p.lengths)[:, None] + offsets
        if recycle:
            drafts = jnp.concatenate([window[:, None], _candidates(window, state.pool)], axis=1)  # [B, 1+P, W]
        else:
            drafts = window[:, None]
        rows_positions = jnp.repeat(positions, group, axis=0)
        verified, drafted, cache = drafting.predict(model, layout, drafts.reshape(batch * group, width),
                                                    rows_positions, group_seeds, state.cache, o.sampling)
        verified = verified.reshape(batch, group, width)
        accepted_rows = accepted_prefix(drafts, verified, live[:, None])  # [B, 1+P]
        winner = jnp.argmax(accepted_rows, axis=1)  # the first maximum: the main draft on ties
        accepted = jnp.max(accepted_rows, axis=1)
        tokens = jnp.take_along_axis(drafts, winner[:, None, None], axis=1)[:, 0]
        verified_win = jnp.take_along_axis(verified, winner[:, None, None], axis=1)[:, 0]
        drafted_win = jnp.take_along_axis(drafted.reshape(batch, group, width), winner[:, None, None], axis=1)[:, 0]
        if recycle:
            cache = _share_winner(cache, jnp.arange(batch) * group + winner, p.lengths + prompt_lengths, group, width)

        keep, _ = truncate_at_eos(tokens, jnp.minimum(accepted, o.max_new_tokens - p.lengths), o.eos_id)
        beyond_first = (offsets[None, :] > 0) & (offsets[None, :] < keep[:, None])
        fresh_value = (state.set_at == step - 1) & (tokens == window)
        p = dataclasses.replace(
            p,
            passes=p.passes + active,
            fast_forwarded=p.fast_forwarded + jnp.where(active, (beyond_first & fresh_value).sum(1), 0),
            stationary=p.stationary + jnp.where(active, (beyond_first & ~fresh_value).sum(1), 0),
        )
        frontier = p.lengths
        p = commit(p, tokens, accepted, active, o)
        pool, pool_next = state.pool, state.pool_next
        if recycle:
            # The main draft's rejected tail: n tokens from its first rejected one (-1 past the live end).
            main_accepted = accepted_rows[:, 0]
            source = main_accepted[:, None] + jnp.arange(n)
            tail = jnp.take_along_axis(window, jnp.minimum(source, width - 1), axis=1)
            tail = jnp.where(source < live[:, None], tail, -1)
            push = active & ~p.done & (main_accepted < live)
            slot = jnp.where(push, pool_next, recycle)  # out of range: dropped
            pool = pool.at[jnp.arange(batch), slot].set(tail, mode="drop")
            pool_next = jnp.where(push, (pool_next + 1) % recycle, pool_next)

        # The block structure after the commit (module docstring); counts are in generated tokens.
        f = jnp.where(active, accepted, 0) + frontier  # the frontier the slide below starts from
        remaining = jnp.maximum(state.end - f, 0)
        several = remaining > n  # two blocks or more still hold live tokens: the live end stays put
        alone_start = jnp.where(live > n, state.end - n, state.start)
        alone_count = f - alone_start  # the first block's accepted tokens; n or more: it is complete
        alone_start = alone_start + n * (alone_count // n)
        newest = (state.end - n - frontier)[:, None] + jnp.arange(n)  # the newest block's slots in this pass
        newest_tokens = jnp.take_along_axis(tokens, jnp.clip(newest, 0, width - 1), axis=1)
        newest_predicted = jnp.take_along_axis(drafted_win, jnp.clip(newest - 1, 0, width - 1), axis=1)
        newest_count = 1 + jnp.cumprod(newest_tokens[:, 1:] == newest_predicted[:, 1:], axis=1).sum(axis=1)
        count = jnp.where(several, newest_count, alone_count)
        in_flight = jnp.maximum(-(-remaining // n), 1)
        spawn = (in_flight < shape.blocks) & (count >= shape.spawn_at)
        end = jnp.where(several, state.end, f + n)
        end = jnp.where(spawn, jnp.where(several, state.end + n, alone_start + 2 * n), end)

        # Slide: slot 0 of the new draft is the verifier's prediction after the accepted prefix (final);
        # slot i > 0 is the drafter's prediction at the position before it when that position was live
        # in this pass, else a guess.
        source = accepted[:, None] - 1 + offsets
        shifted = jnp.take_along_axis(drafted_win, jnp.minimum(source, width - 1), axis=1)
        shifted = shifted.at[:, 0].set(jnp.take_along_axis(verified_win, accepted[:, None] - 1, axis=1)[:, 0])
        text = Text.of(prompt_tokens, prompt_lengths, p)
        guesses = _guesses(key, row_seeds, shifted[:, 0], text, options=o, blocks=shape.blocks, vocab=vocab)
        from_prediction = source < live[:, None]
        new_window = jnp.where(from_prediction, shifted, guesses)
        new_window = refill_by_lookup(new_window, text, options=o)
        old_index = source + 1
        old_token = jnp.take_along_axis(tokens, jnp.minimum(old_index, width - 1), axis=1)
        old_set_at = jnp.take_along_axis(
            jnp.where(tokens == window, state.set_at, -1), jnp.minimum(old_index, width - 1), axis=1
        )
        unchanged = from_prediction & (old_index < width) & (old_token == new_window)
        set_at = jnp.where(unchanged, old_set_at, jnp.where(from_prediction, step, -1))
        p = commit(p, new_window[:, :1], jnp.ones((batch,), jnp.int32), active, o, only_if_final=True)
        keep_old = ~active
        return _State(
            cache,
            p,
            jnp.where(keep_old[:, None], window, new_window),
            jnp.where(keep_old[:, None], state.set_at, set_at),
            jnp.where(keep_old, state.end, end),
            jnp.where(keep_old, state.start, alone_start),
            pool,
            pool_next,
            step,
        )

    max_steps = o.max_new_tokens + 1  # every pass settles at least one token
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.progress.done) & (s.step < max_steps), iterate, state)
    p = state.progress
    cache = state.cache
    if recycle:
        cache = cache.map_layers(lambda layer: layer[::group])
    blocks = -(-(p.lengths - 1) // n)  # blocks of n generated tokens after the first, as rolling Jacobi
    return DecodeOutput(tokens=p.generated[:, : o.max_new_tokens], lengths=p.lengths, forward_passes=p.passes,
                        blocks=blocks, fast_forwarded=p.fast_forwarded, stationary=p.stationary, cache=cache)
