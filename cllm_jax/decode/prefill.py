"""What every decoding strategy starts with: a padded prompt batch, its prefill, the first token."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.decode.sampling import Sampling, choose_tokens
from cllm_jax.errors import InputError
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.model.interface import CausalLM

MIN_BUCKET = 16


def bucket_length(n: int, minimum: int = MIN_BUCKET) -> int:
    """Round up to a power of two, so prompts of similar lengths share one compiled function."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    tokens: np.ndarray  # [B, bucket] int32, right-padded
    lengths: np.ndarray  # [B] int32
    row_seeds: np.ndarray  # [B] int32: the prompts' indices in the caller's list (for sampling)


def make_prompt_batch(
    prompts: list[list[int]],
    vocab_size: int,
    context_length: int,
    reserve: int,
    row_seeds: list[int] | None = None,
) -> PromptBatch:
    """Validate and pad prompts; `reserve` is what decoding needs after the prompt (new tokens + block)."""
    if not prompts:
        raise InputError("no prompts given: pass at least one prompt")
    for i, ids in enumerate(prompts):
        if len(ids) == 0:
            raise InputError(f"prompt {i} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if len(ids) + reserve > context_length:
            raise InputError(
                f"prompt {i} has {len(ids)} tokens; with {reserve} tokens reserved for generation it exceeds the "
                f"context of {context_length}: shorten the prompt or generate fewer new tokens"
            )
    bucket = bucket_length(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), bucket), np.int32)  # padding is never attended to
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
    lengths = np.array([len(p) for p in prompts], np.int32)
    seeds = np.array(row_seeds if row_seeds is not None else range(len(prompts)), np.int32)
    return PromptBatch(tokens, lengths, seeds)


def cache_length_for(bucket: int, max_new_tokens: int, block_size: int = 1) -> int:
    """Slots for the padded prompt plus generation plus one block of look-ahead, rounded up."""
    return bucket_length(bucket + max_new_tokens + block_size)


def prefill(
    model: CausalLM, tokens: jax.Array, lengths: jax.Array, row_seeds: jax.Array, cache: KVCache, sampling: Sampling,
    adapter_gate: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run the prompts through the model; returns the first generated token [B] and the cache."""
    batch, time = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
    hidden, cache = model(tokens, positions, cache, adapter_gate=adapter_gate)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
    first = choose_tokens(model.logits(last), lengths[:, None], row_seeds, sampling)
    return first[:, 0], cache
