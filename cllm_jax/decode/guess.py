"""Initial guesses for the not-yet-decoded tokens of a Jacobi block."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cllm_jax.decode.options import INIT_STRATEGIES, JacobiOptions
from cllm_jax.decode.state import Text


def guess_tokens(
    key: jax.Array,
    row_seeds: jax.Array,
    start_positions: jax.Array,
    *,
    strategy: str,
    shape: tuple[int, int],
    first: jax.Array,
    text: Text,
    vocab_size: int,
    pad_id: int,
) -> jax.Array:
    """Guesses of `shape` [B, m] for the positions after the known token `first` [B] that follows `text`.

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
    if strategy in ("prefix-sample", "lookup"):  # lookup: where the text has no earlier match (lookup_guesses)
        prompt_tokens, prompt_lengths, generated = text.prompt_tokens, text.prompt_lengths, text.generated
        index = draw(text.lengths)
        in_prompt = index < prompt_lengths[:, None]
        from_prompt = jnp.take_along_axis(prompt_tokens, jnp.minimum(index, prompt_tokens.shape[1] - 1), axis=1)
        gen_index = jnp.clip(index - prompt_lengths[:, None], 0, generated.shape[1] - 1)
        from_generated = jnp.take_along_axis(generated, gen_index, axis=1)
        return jnp.where(in_prompt, from_prompt, from_generated).astype(jnp.int32)
    raise ValueError(f"unknown initial guess '{strategy}' (choose from {', '.join(INIT_STRATEGIES)})")


def lookup_guesses(window: jax.Array, text: Text) -> jax.Array:
    """Prompt lookup as a Jacobi guess: window[:, 1:] continues the text from an earlier match.

    The known text of a row is prompt ++ generated ++ window[:, 0] (the window's first token is
    final). The guess copies what followed the latest earlier occurrence of its last two tokens
    (else of its last token), as transformers' prompt-lookup decoding drafts; where the copy runs
    into the end of the text it repeats the matched span, so a loop the model is in is guessed
    whole. Rows with no earlier occurrence keep their window. A guess decides only how soon the
    fixed point is found, never what it is, and this one costs no extra rows.
    """
    batch, n = window.shape
    prompt_tokens, generated = text.prompt_tokens, text.generated
    prompt_width, generated_width = prompt_tokens.shape[1], generated.shape[1]
    index = jnp.arange(prompt_width + generated_width + 1, dtype=jnp.int32)[None, :]
    prompt_end = text.prompt_lengths[:, None]
    generated_end = text.lengths[:, None]
    key_end = generated_end  # the index of the key's last token, window[:, 0]

    def at(tokens, i):
        return jnp.take_along_axis(tokens, jnp.clip(i, 0, tokens.shape[1] - 1), axis=1)

    known = jnp.where(index < prompt_end, at(prompt_tokens, index),
                      jnp.where(index < generated_end, at(generated, index - prompt_end), window[:, :1]))  # fmt: skip
    last, before = window[:, :1], at(known, key_end - 1)
    previous = jnp.pad(known[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    one = (index < key_end) & (known == last)  # an earlier occurrence, not the key itself
    two = one & (index >= 1) & (previous == before)
    latest_two, latest_one = (jnp.max(jnp.where(m, index, -1), axis=1) for m in (two, one))
    match_end = jnp.where(latest_two >= 0, latest_two, latest_one)[:, None]  # [B, 1], -1: none
    period = jnp.maximum(key_end - match_end, 1)
    offset = jnp.arange(n - 1, dtype=jnp.int32)[None, :]
    copied = at(known, match_end + 1 + jnp.mod(offset, period))
    rest = jnp.where(match_end >= 0, copied, window[:, 1:])
    return jnp.concatenate([window[:, :1], rest], axis=1)


def guess_block(key, row_seeds, first, text: Text, *, options: JacobiOptions, vocab: int) -> jax.Array:
    """`first` [B], then n - 1 drawn guesses, before any lookup."""
    shape = (first.shape[0], options.block_size - 1)
    rest = guess_tokens(key, row_seeds, text.lengths, strategy=options.init, shape=shape, first=first, text=text,
                        vocab_size=vocab, pad_id=options.pad_id)
    return jnp.concatenate([first[:, None], rest], axis=1)


def refill_by_lookup(window, text: Text, *, options: JacobiOptions):
    """With init "lookup", window[:, 1:] continues the text by prompt lookup where the text has a match.

    window[:, 0] is final and follows the committed text (text.generated) in every method. In
    a rolling or multiblock window, slots 1.. hold predictions made after a token that was just
    rejected; the lookup is keyed on final tokens only, so where it finds a match it replaces them
    (looking up only the freed tail slots halved the TPF gain in a measurement on a trained model).
    """
    if options.init != "lookup":
        return window
    return lookup_guesses(window, text)


def next_guess(key, row_seeds, first, text: Text, *, options: JacobiOptions, vocab: int) -> jax.Array:
    """A fresh block: the known token `first` [B], then n - 1 guesses (by lookup where init is "lookup")."""
    block = guess_block(key, row_seeds, first, text, options=options, vocab=vocab)
    return refill_by_lookup(block, text, options=options)
