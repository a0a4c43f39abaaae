"""Initial guesses for the not-yet-decoded tokens of a Jacobi block."""

from __future__ import annotations

import jax
import jax.numpy as jnp

INIT_STRATEGIES = ("prefix-sample", "pad", "repeat-last", "random-vocab")


def guess_tokens(
    key: jax.Array,
    row_seeds: jax.Array,
    start_positions: jax.Array,
    strategy: str,
    shape: tuple[int, int],
    first: jax.Array,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    generated: jax.Array,
    generated_lengths: jax.Array,
    vocab_size: int,
    pad_id: int,
) -> jax.Array:
    """Guesses of `shape` [B, m] for the positions after the known token `first` [B].

    prefix-sample (the reference default) draws uniformly with replacement from the current prefix:
    the prompt plus everything generated so far. Random draws are keyed by (row seed, position of the
    block), not by batch layout, so a prompt gets the same guesses in any batch, shard or resumed run.
    """
    row_keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.fold_in(key, s), p))(row_seeds, start_positions)

    def draw(high):
        return jax.vmap(lambda k, h: jax.random.randint(k, shape[1:], 0, h, jnp.int32))(row_keys, high)

    if strategy == "pad":
        return jnp.full(shape, pad_id, jnp.int32)
    if strategy == "repeat-last":
        return jnp.broadcast_to(first[:, None], shape).astype(jnp.int32)
    if strategy == "random-vocab":
        return draw(jnp.full((shape[0],), vocab_size, jnp.int32))
    if strategy == "prefix-sample":
        prefix_lengths = prompt_lengths + generated_lengths
        index = draw(prefix_lengths)
        in_prompt = index < prompt_lengths[:, None]
        from_prompt = jnp.take_along_axis(prompt_tokens, jnp.minimum(index, prompt_tokens.shape[1] - 1), axis=1)
        gen_index = jnp.clip(index - prompt_lengths[:, None], 0, generated.shape[1] - 1)
        from_generated = jnp.take_along_axis(generated, gen_index, axis=1)
        return jnp.where(in_prompt, from_prompt, from_generated).astype(jnp.int32)
    raise ValueError(f"unknown initial guess '{strategy}' (choose from {', '.join(INIT_STRATEGIES)})")
