"""The decoding state every method shares: the output record, per-row progress, and committing tokens.

Rows of a batch advance independently: each has its own generated length, and finishes at its EOS
or at the budget while the others go on (a finished row's later passes change nothing).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp

from cllm_jax.decode.options import DecodeOptions
from cllm_jax.model.kv_cache import KVCache


class _Typed:
    """`Int["B n"]`: a jax.Array of this dtype with the named dimensions (B rows, n the block, ...), the
    way a loop state types its fields so that a reader (and a type checker) sees the shape in the type;
    nothing is checked while the loop runs."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def __getitem__(self, shape: str):
        return Annotated[jax.Array, self.dtype, shape]


Int, Bool = _Typed("int32"), _Typed("bool")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeOutput:
    """What every method returns; Jacobi methods fill the counters AR leaves at zero."""

    tokens: jax.Array  # [B, max_new_tokens], valid up to `lengths`
    lengths: jax.Array  # [B] generated tokens, the EOS included when hit
    forward_passes: jax.Array  # [B] the prefill counts as the pass that produced the first token
    blocks: jax.Array  # [B] converged Jacobi blocks (blocks of n generated tokens, for windows)
    fast_forwarded: jax.Array  # [B]
    stationary: jax.Array  # [B]
    cache: KVCache
    trajectory: jax.Array | None = None  # fixed-block recording only: [B, blocks, states, n]
    trajectory_states: jax.Array | None = None  # [B, blocks] states recorded per block
    acceptance: jax.Array | None = None  # drafting methods: [B, 1 + C, k + 2] passes by accepted length,
    #   row 0 what was committed, row 1 + c what candidate c alone would have had accepted


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Progress:
    """Per-row output and counters of the Jacobi methods."""

    generated: Int["B max_new+room"]  # room: a whole window may be written past the budget
    lengths: Int["B"]  # tokens generated, the EOS included
    done: Bool["B"]  # at its EOS or its budget
    passes: Int["B"]  # forward passes, the prefill's included
    blocks: Int["B"]
    fast_forwarded: Int["B"]
    stationary: Int["B"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class Text:
    """A row's text so far, what guesses are drawn from and copied out of: the prompt, then what was
    committed. One bundle, so the guess functions take it instead of four arrays in a fixed order."""

    prompt_tokens: Int["B P"]  # left-aligned, valid up to prompt_lengths
    prompt_lengths: Int["B"]
    generated: Int["B max_new+room"]  # valid up to generated_lengths
    generated_lengths: Int["B"]

    @classmethod
    def of(cls, prompt_tokens: jax.Array, prompt_lengths: jax.Array, progress: Progress) -> "Text":
        return cls(prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths, generated=progress.generated,
                   generated_lengths=progress.lengths)

    @property
    def lengths(self) -> jax.Array:
        """[B] tokens of text per row: the position the next committed token takes."""
        return self.prompt_lengths + self.generated_lengths


def start_progress(first: jax.Array, options: DecodeOptions, room: int) -> Progress:
    """Progress after the prefill's token `first` [B]; `room`: slots past the budget a commit may write."""
    batch = first.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    generated = jnp.zeros((batch, options.max_new_tokens + room), jnp.int32)
    progress = Progress(generated=generated, lengths=zeros, done=jnp.zeros((batch,), bool), passes=zeros + 1,
                        blocks=zeros, fast_forwarded=zeros, stationary=zeros)
    return commit(progress, first[:, None], zeros + 1, jnp.ones((batch,), bool), options, only_if_final=True)


def commit(progress: Progress, tokens: jax.Array, count: jax.Array, rows: jax.Array, options: DecodeOptions,
           only_if_final: bool = False) -> Progress:
    """Append the first `count` tokens [B, m] to the `rows` that are not done; finish at EOS or budget.

    With only_if_final, a row commits just when this ends it (the token is EOS or fills the budget):
    a block that begins with such a token needs no forward pass.
    """
    rows = rows & ~progress.done
    count = jnp.minimum(count, options.max_new_tokens - progress.lengths)
    keep, hit = truncate_at_eos(tokens, count, options.eos_id)
    lengths = progress.lengths + keep
    finished = hit | (lengths >= options.max_new_tokens)
    if only_if_final:
        rows = rows & finished
    generated = jnp.where(rows[:, None], write_rows(progress.generated, tokens, progress.lengths), progress.generated)
    return dataclasses.replace(
        progress,
        generated=generated,
        lengths=jnp.where(rows, lengths, progress.lengths),
        done=progress.done | (rows & finished),
    )


def truncate_at_eos(tokens: jax.Array, count: jax.Array, eos_id: int | None) -> tuple[jax.Array, jax.Array]:
    """How many of the first `count` tokens [B, n] to keep (through the first EOS) and whether EOS was hit."""
    index = jnp.arange(tokens.shape[1])[None, :]
    if eos_id is None:
        return count, jnp.zeros(count.shape, bool)
    is_eos = (tokens == eos_id) & (index < count[:, None])
    hit = is_eos.any(axis=1)
    keep = jnp.where(hit, jnp.argmax(is_eos, axis=1) + 1, count)
    return keep, hit


def write_rows(buffer: jax.Array, values: jax.Array, starts: jax.Array) -> jax.Array:
    """buffer[b, starts[b] : starts[b] + n] = values[b] for every row (rows advance independently)."""
    return jax.vmap(lambda row, v, s: jax.lax.dynamic_update_slice(row, v, (s,)))(buffer, values, starts)


def accepted_prefix(tokens: jax.Array, predicted: jax.Array, live: jax.Array | None = None) -> jax.Array:
    """1 + the longest prefix of tokens[..., 1:] equal to predicted[..., :-1] (within `live` tokens):
    how many tokens of a window whose first token is final the predictions confirm."""
    agrees = tokens[..., 1:] == predicted[..., :-1]
    if live is not None:
        agrees = agrees & (jnp.arange(1, tokens.shape[-1]) < live[..., None])
    return 1 + jnp.cumprod(agrees, axis=-1).sum(axis=-1)
