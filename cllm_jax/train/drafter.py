"""The placeholder drafter's objective: teacher forcing on the base model's own text at random anchors.

A drafter (cllm_jax/decode/placeholder.py) sees the text up to an anchor token t and k placeholders
at positions t + 1 .. t + k; placeholder j predicts the token at t + 2 + j (the base model itself
predicts t + 1 in the same pass). Training lays many anchors of one sequence into one row:

    tokens     the text (the prompt and the base model's greedy continuation), then A groups of k
               placeholder ids (vocab_size + j)
    positions  0 .. T - 1 for the text, t + 1 + j for placeholder j of the group anchored at t
    mask       the text is causal and never sees a placeholder; a placeholder sees the text up to its
               anchor and the placeholders of its own group up to itself
    gate       on for the placeholders only, so the text is the base model's own forward pass

so one pass over a row trains A * k draft predictions, and the text's hidden states are the base
model's (the distillation target, `target: base`). `forward` runs it as two passes, the text's
outside the gradient. The loss weighs draft position j by
decay^j: a pass accepts draft j only if drafts 0 .. j - 1 were right, so early positions decide.

The data are the records' complete generations (one per prompt): the fixed points of Jacobi
collection, or of a collection with `method: ar` (batched autoregressive decoding, the cheaper one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cllm_jax.data.records import TrajectoryRecord
from cllm_jax.errors import DataError
from cllm_jax.model.kv_cache import KVCache
from cllm_jax.train import losses
from cllm_jax.train.batching import HostBatch
from cllm_jax.train.spec import example_order, record_rng, round_up, stack_rows

ROW_KEYS = {
    "text": ("T", np.int32),
    "anchor": ("P", np.int32),  # the anchor's position, per placeholder
    "group": ("P", np.int32),  # 1 + the anchor's ordinal in the row; 0: padding
    "draft_index": ("P", np.int32),  # j
    "labels": ("P", np.int32),  # the token at anchor + 2 + j
    "weights": ("P", np.float32),  # decay^j, 0 past the text's end and on padding
}
TERMS = ("loss_draft", "loss_first_draft")  # the weighted loss, and the first draft position's alone


@dataclasses.dataclass(frozen=True)
class DrafterSpec:
    placeholders: int  # k
    anchors: int
    decay: float
    target: str  # tokens | base
    max_seq_len: int
    pad_multiple: int
    seed: int
    shuffle: bool


def sequences(records: Sequence[TrajectoryRecord]) -> list[tuple[tuple[int, ...], int]]:
    """(prompt + generation, prompt length) once per prompt, in first-seen order."""
    seen, out = set(), []
    for record in records:
        if record.data_id in seen:
            continue
        seen.add(record.data_id)
        out.append((record.complete_teacher_output_ids, record.prompt_ids_len))
    return out


def drafter_row(ids: Sequence[int], prompt_length: int, rng: np.random.Generator, spec: DrafterSpec) -> dict | None:
    """One row: the text and A anchors' placeholders; None when the generation is too short to train."""
    k = spec.placeholders
    ids = np.asarray(ids[: spec.max_seq_len], np.int32)
    # Anchors from the prompt's last token (the drafts after the prefill) to the last that has a label.
    low, high = prompt_length - 1, len(ids) - 3
    if high < low:
        return None
    count = min(spec.anchors, high - low + 1)
    anchors = np.sort(rng.choice(np.arange(low, high + 1), size=count, replace=False)).astype(np.int32)
    anchor = np.repeat(anchors, k)
    draft_index = np.tile(np.arange(k, dtype=np.int32), count)
    label_at = anchor + 2 + draft_index
    inside = label_at < len(ids)
    return {
        "text": ids,
        "anchor": anchor,
        "group": np.repeat(np.arange(1, count + 1, dtype=np.int32), k),
        "draft_index": draft_index,
        "labels": np.where(inside, ids[np.minimum(label_at, len(ids) - 1)], 0).astype(np.int32),
        "weights": np.where(inside, spec.decay ** draft_index, 0.0).astype(np.float32),
    }


class DrafterData:
    """The drafter's examples (one per prompt) and the batch of any data position, as DataSource gives."""

    def __init__(self, records: Sequence[TrajectoryRecord], spec: DrafterSpec):
        self.spec = spec
        self.examples = sequences(records)
        if not self.examples:
            raise DataError("no trajectory records to train on: check data.trajectories")

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        return example_order(self.spec.seed, epoch, len(self), self.spec.shuffle)

    def batch(self, epoch: int, cursor: int, shape: tuple[int, int], rows: slice | None = None):
        accum, size = shape
        order = self.order(epoch)
        slots = [int(order[c]) if c < len(order) else -1 for c in range(cursor, cursor + accum * size)]
        built = [drafter_row(*self.examples[s], record_rng(self.spec.seed, epoch, s), self.spec) if s >= 0 else None
                 for s in slots]
        longest_text = max((len(r["text"]) for r in built if r is not None), default=1)
        dims = {"T": round_up(longest_text, self.spec.pad_multiple, self.spec.max_seq_len),
                "P": self.spec.anchors * self.spec.placeholders}  # one shape for every batch
        rows = rows or slice(0, size)
        local = [built[a * size + b] for a in range(accum) for b in range(size)[rows]]
        arrays = stack_rows(local, ROW_KEYS, dims, (accum, len(range(size)[rows])))
        global_shapes = {k: (accum, size) + v.shape[2:] for k, v in arrays.items()}
        tokens = sum(len(r["text"]) + len(r["anchor"]) for r in built if r is not None)
        return HostBatch(arrays, global_shapes, tokens=tokens, examples=sum(r is not None for r in built))


def denominators(batch: dict) -> jax.Array:
    """The weights of the whole global batch (each micro-batch's loss is divided by them)."""
    return jnp.sum(batch["weights"]), jnp.sum(jnp.where(batch["draft_index"] == 0, batch["weights"], 0.0))


def forward(model, micro: dict, remat=False) -> tuple[jax.Array, jax.Array]:
    """(the text's hidden states [B, T, D], the placeholders' [B, P, D]) of a micro-batch's rows.

    Two passes, so that only the placeholders are differentiated: the text through the base model
    alone (gate off) into a KV cache, outside the gradient; then the placeholders attending to it and
    to their own group, their K/V in the slots after the text. One pass over [text, placeholders]
    computes the same, but its backward pass would run over the text too.
    """
    text, anchor, group, j = micro["text"], micro["anchor"], micro["group"], micro["draft_index"]
    batch, time = text.shape
    places = anchor.shape[1]
    cache = KVCache.zeros(model.config, batch, time + places)
    positions = jnp.broadcast_to(jnp.arange(time), (batch, time))
    text_hidden, cache = model(text, positions, cache, adapter_gate=jnp.zeros((batch, time)))
    text_hidden, cache = jax.lax.stop_gradient((text_hidden, cache))
    sees_text = jnp.arange(time)[None, None, :] <= anchor[:, :, None]
    own_group = (group[:, :, None] == group[:, None, :]) & (j[:, None, :] <= j[:, :, None]) & (group[:, :, None] > 0)
    mask = jnp.concatenate([sees_text, own_group | jnp.eye(places, dtype=bool)], axis=2)  # padding sees itself
    slots = jnp.broadcast_to(time + jnp.arange(places), (batch, places))
    draft_hidden, _ = model(model.config.vocab_size + j, anchor + 1 + j, cache, mask=mask, remat=remat, slots=slots,
                            adapter_gate=jnp.ones((batch, places)))
    return text_hidden, draft_hidden


def micro_loss(params, graphdef, micro: dict, denoms: tuple, target: str, remat, frozen, rng=None):
    """(loss, (weighted draft loss, first-position loss)) of one micro-batch; divided by global weights."""
    del rng  # no adapter dropout in this objective (its config refuses it)
    model = nnx.merge(graphdef, params, frozen)
    text_hidden, draft_hidden = forward(model, micro, remat)
    time = micro["text"].shape[1]
    draft_logits = model.logits(draft_hidden)
    weights = micro["weights"]
    first = jnp.where(micro["draft_index"] == 0, weights, 0.0)
    if target == "base":  # the base model's own distribution of the same token: the text's hidden states
        at = jnp.minimum(micro["anchor"] + 1 + micro["draft_index"], time - 1)
        teacher = model.logits(jnp.take_along_axis(text_hidden, at[..., None], axis=1))
        draft = losses.consistency_loss(draft_logits, teacher, weights, "forward_kl", denom=denoms[0])
        first_loss = losses.consistency_loss(draft_logits, teacher, first, "forward_kl", denom=denoms[1])
    else:
        draft = losses.ar_loss(draft_logits, micro["labels"], weights, denom=denoms[0])
        first_loss = losses.ar_loss(draft_logits, micro["labels"], first, denom=denoms[1])
    return draft, (draft, jax.lax.stop_gradient(first_loss))
