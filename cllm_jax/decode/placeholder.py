"""Lossless decoding with a placeholder drafter: the base model verifies and drafts in one row, one pass.

The drafter is the base model plus a gated adapter with k learned placeholder embeddings
(cllm_jax/model/adapter.py): after a token, k placeholder tokens at the next k positions, with the
adapter on them only, predict the k tokens after the base model's next one. Every real token of a
row is computed by the base weights alone (the gate selects), so whatever the drafter computes, the
committed text is the base model's autoregressive output, greedy or seeded-sampled (sampling.py).

A pass decodes one row per prompt, laid out as a tree (`Tree`) at positions from the frontier f:
- the window: window[0] (final: the base model's token after the committed text) and k drafted tokens;
- optionally a second candidate, the prompt-lookup continuation of window[0] (k tokens at the same
  positions, attending to window[0] and to each other, not to the drafter's tokens);
- placeholder groups: k placeholders after each verified token ("every": whatever prefix is
  accepted, its drafts for the next pass exist; "main": after the drafter's tokens only; "last":
  after the last only, the cheap layout that drafts only when everything is accepted).
The base model's predictions accept the longest verified prefix of each candidate (the longer one
wins, the drafter on ties) plus the exact token after it; the group after the last accepted token
gives the next pass's drafts (prompt lookup or drawn guesses where there is none).

The cache keeps the base model's K/V of the committed text at slot == position. The window's tokens
write their own positions' slots; every other token of the tree (the lookup candidate, the
placeholders) writes one of the scratch slots past the end, so no drafter K/V ever enters the text's
slots; when the lookup candidate wins, its accepted tokens' K/V are copied into the text's slots.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.decode.guess import guess_tokens, lookup_guesses
from cllm_jax.decode.options import INIT_STRATEGIES, DecodeOptions, option
from cllm_jax.decode.prefill import prefill
from cllm_jax.decode.sampling import choose_tokens
from cllm_jax.decode.state import DecodeOutput, Progress, Text, accepted_prefix, commit, start_progress
from cllm_jax.errors import ConfigError
from cllm_jax.model.interface import CausalLM
from cllm_jax.model.kv_cache import KVCache

GROUP_PLACEMENTS = ("every", "main", "last")


@dataclasses.dataclass(frozen=True)
class Tree:
    """The static layout of one row: T tokens, the first k + 1 the window (slots = positions)."""

    depth: np.ndarray  # [T] position offset from the frontier
    visible: np.ndarray  # [T, T] bool: token t attends to token u of the row (its ancestors and itself)
    placeholder: np.ndarray  # [T] the placeholder index j of a placeholder token, -1 for a real token
    candidates: np.ndarray  # [C, k + 1] row index of each candidate's tokens (0: the window, 1: lookup)
    groups: np.ndarray  # [C, k + 1] row index of the first placeholder after each candidate token, -1: none

    @property
    def size(self) -> int:
        return len(self.depth)

    @property
    def scratch(self) -> int:
        return self.size - self.candidates.shape[1]


def build_tree(drafts: int, groups: str, lookup: bool) -> Tree:
    """The row layout for k = `drafts`, the placement of placeholder groups and the lookup candidate."""
    parent, depth, placeholder = [], [], []

    def add(up: int, at: int, index: int = -1) -> int:
        parent.append(up), depth.append(at), placeholder.append(index)
        return len(parent) - 1

    window = [add(-1, 0)]
    for i in range(1, drafts + 1):
        window.append(add(window[-1], i))
    candidates = [window]
    if lookup:
        branch = [window[0]]
        for i in range(1, drafts + 1):
            branch.append(add(branch[-1], i))
        candidates.append(branch)
    hosts = {"every": sorted({t for c in candidates for t in c}), "main": window, "last": [window[-1]]}[groups]
    first_placeholder = {}
    for host in hosts:
        up = host
        for j in range(drafts):
            up = add(up, depth[host] + 1 + j, j)
            first_placeholder.setdefault(host, up)
    size = len(parent)
    visible = np.zeros((size, size), bool)
    for t in range(size):
        u = t
        while u >= 0:
            visible[t, u] = True
            u = parent[u]
    group_rows = np.array([[first_placeholder.get(t, -1) for t in c] for c in candidates], np.int32)
    return Tree(np.array(depth, np.int32), visible, np.array(placeholder, np.int32),
                np.array(candidates, np.int32), group_rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlaceholderOptions(DecodeOptions):
    drafts: int = option(4, "k: drafted tokens verified per pass (at most the drafter's placeholders)", at_least=1)
    groups: str = option("every", "placeholder groups after every verified token, the drafter's only (main), or "
                         "the last one only", choices=GROUP_PLACEMENTS)
    lookup: int = option(1, "also verify the prompt-lookup continuation in the same pass (1) or not (0)",
                         choices=(0, 1))
    init: str = option("lookup", "the guesses where no drafts exist (the first pass, a token without a group)",
                       choices=INIT_STRATEGIES)
    pad_id: int = option(0, "the guessed token of init=pad", at_least=0)

    @property
    def tree(self) -> Tree:
        return build_tree(self.drafts, self.groups, bool(self.lookup))

    @property
    def lookahead(self) -> int:
        return self.drafts + 1

    @property
    def pass_tokens(self) -> int:
        return self.tree.size

    def cache_shape(self, batch: int, slots: int) -> tuple[int, int]:
        return batch, slots + self.tree.scratch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
    cache: KVCache  # [L, B, S + scratch, KV, D]
    progress: Progress
    window: jax.Array  # [B, k + 1] int32: window[:, 0] final, then the drafts
    acceptance: jax.Array  # [B, 1 + C, k + 2] int32: passes by accepted length, committed then per candidate
    step: jax.Array  # [] int32


def _guesses(key, row_seeds, first, text: Text, *, options: PlaceholderOptions, vocab: int):
    """[B, k + 1]: `first` [B], then k guesses (by lookup where the text has a match, with init lookup)."""
    o = options
    rest = guess_tokens(key, row_seeds, text.lengths, strategy=o.init, shape=(first.shape[0], o.drafts), first=first,
                        text=text, vocab_size=vocab, pad_id=o.pad_id)
    window = jnp.concatenate([first[:, None], rest], axis=1)
    if o.init == "lookup":
        window = lookup_guesses(window, text)
    return window


def _row_mask(tree: Tree, frontier: jax.Array, slots: jax.Array, length: int) -> jax.Array:
    """[B, T, length]: the committed text (slots before the frontier) and the token's own ancestors."""
    slot = jnp.arange(length)[None, None, :]
    own = (slot == slots[:, :, None]).astype(jnp.float32)  # [B, T, S]: each row token's slot
    ancestors = jnp.einsum("tu,bus->bts", jnp.asarray(tree.visible, jnp.float32), own) > 0
    return (slot < frontier[:, None, None]) | ancestors


@functools.partial(jax.jit, static_argnames=("options",), donate_argnames=("cache",))
def generate_placeholder(
    model: CausalLM,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    row_seeds: jax.Array,
    cache: KVCache,
    key: jax.Array,
    options: PlaceholderOptions,
) -> DecodeOutput:
    o, tree = options, options.tree
    k, batch, vocab = o.drafts, prompt_tokens.shape[0], model.config.vocab_size
    drafter = getattr(model, "adapter", None)
    if drafter is None or drafter.placeholders is None:
        raise ConfigError("lossless-placeholder drafts with a placeholder drafter, and the model has none: load "
                          "one (decode.py --draft-adapter NAME|DIR) or train one (train.py drafter)")
    if k > drafter.placeholders.shape[0]:
        raise ConfigError(f"drafts {k} is more than the drafter's {drafter.placeholders.shape[0]} placeholders: "
                          f"pass --drafts {drafter.placeholders.shape[0]} or fewer")
    num_candidates = tree.candidates.shape[0]
    scratch_start = cache.length - tree.scratch
    depth = jnp.asarray(tree.depth)
    is_placeholder = jnp.asarray(tree.placeholder >= 0)
    placeholder_ids = jnp.asarray(vocab + np.maximum(tree.placeholder, 0), jnp.int32)
    scratch_slots = scratch_start + jnp.arange(tree.scratch, dtype=jnp.int32)

    first, cache = prefill(model, prompt_tokens, prompt_lengths, row_seeds, cache, o.sampling,
                           adapter_gate=jnp.zeros(prompt_tokens.shape))
    progress = start_progress(first, o, k + 1)
    window = _guesses(key, row_seeds, first, Text.of(prompt_tokens, prompt_lengths, progress), options=o, vocab=vocab)
    state = _State(cache, progress, window, jnp.zeros((batch, 1 + num_candidates, k + 2), jnp.int32), jnp.int32(0))
    rows = jnp.arange(batch)

    def iterate(state: _State) -> _State:
        p, window = state.progress, state.window
        active = ~p.done
        frontier = prompt_lengths + p.lengths  # [B] the position of window[:, 0]
        positions = frontier[:, None] + depth  # [B, T]
        candidates = [window]
        if num_candidates > 1:
            candidates.append(lookup_guesses(window, Text.of(prompt_tokens, prompt_lengths, p)))
        real = jnp.concatenate([window] + [c[:, 1:] for c in candidates[1:]], axis=1)  # [B, C*k + 1]
        tokens = jnp.where(is_placeholder, placeholder_ids,
                           jnp.pad(real, ((0, 0), (0, tree.size - real.shape[1]))))  # [B, T]
        slots = jnp.concatenate([positions[:, : k + 1], jnp.broadcast_to(scratch_slots, (batch, tree.scratch))], 1)
        mask = _row_mask(tree, frontier, slots, state.cache.length)
        hidden, cache = model(tokens, positions, state.cache, mask=mask, slots=slots,
                              adapter_gate=jnp.broadcast_to(is_placeholder, tokens.shape))
        predicted = choose_tokens(model.logits(hidden), positions + 1, row_seeds, o.sampling)  # [B, T]
        predicted = jnp.clip(predicted, 0, vocab - 1)  # a drafter's garbage is still a token id

        drafts = jnp.stack(candidates, axis=1)  # [B, C, k + 1]
        verified = predicted[:, tree.candidates]  # [B, C, k + 1]: the base model's token after each
        accepted_each = accepted_prefix(drafts, verified)  # [B, C]
        winner = jnp.argmax(accepted_each, axis=1)  # the first maximum: the drafter on ties
        accepted = jnp.max(accepted_each, axis=1)
        committed_tokens = drafts[rows, winner]
        bonus = verified[rows, winner, accepted - 1]  # the base model's token after the accepted prefix

        counts = jnp.concatenate([accepted[:, None], accepted_each], axis=1)  # [B, 1 + C]
        acceptance = state.acceptance + (active[:, None, None] & (counts[:, :, None] == jnp.arange(k + 2)))
        if num_candidates > 1:  # the lookup candidate's accepted K/V move from scratch to the text's slots
            offsets = jnp.arange(1, k + 1)
            text_slots = frontier[:, None] + offsets
            lookup_slots = slots[:, tree.candidates[1, 1:]]
            take = (winner == 1)[:, None] & (offsets < accepted[:, None])
            source = jnp.where(take, lookup_slots, text_slots)
            cache = cache.map_layers(
                lambda buffer: buffer.at[rows[:, None], text_slots].set(buffer[rows[:, None], source], mode="drop"))

        p = dataclasses.replace(p, passes=p.passes + active)
        p = commit(p, committed_tokens, accepted, active, o)
        group = jnp.asarray(tree.groups)[winner, accepted - 1]  # [B] first placeholder of the group, -1: none
        drafted = jnp.take_along_axis(predicted, jnp.maximum(group, 0)[:, None] + jnp.arange(k), axis=1)
        fallback = _guesses(key, row_seeds, bonus, Text.of(prompt_tokens, prompt_lengths, p), options=o, vocab=vocab)
        new_window = jnp.where((group >= 0)[:, None], jnp.concatenate([bonus[:, None], drafted], axis=1), fallback)
        p = commit(p, new_window[:, :1], jnp.ones((batch,), jnp.int32), active, o, only_if_final=True)
        keep_old = ~active
        return _State(cache, p, jnp.where(keep_old[:, None], window, new_window), acceptance, state.step + 1)

    max_steps = o.max_new_tokens + 1  # every pass settles at least one token
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.progress.done) & (s.step < max_steps), iterate, state)
    p = state.progress
    zeros = jnp.zeros((batch,), jnp.int32)
    return DecodeOutput(tokens=p.generated[:, : o.max_new_tokens], lengths=p.lengths, forward_passes=p.passes,
                        blocks=p.passes - 1, fast_forwarded=zeros, stationary=zeros, cache=state.cache,
                        acceptance=state.acceptance)
