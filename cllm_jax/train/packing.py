"""The packed layout: all blocks of a prompt trained in one forward and one backward pass.

After Jacobi Forcing (arXiv 2512.14681). One row holds, in this order:
  chain    the prompt followed by the converged blocks y*_0, y*_1, ... (the greedy output); it is
           causal, and doubles as the teacher-output AR sequence and as the global target
  student  `states_per_block` streams s = 0..S-1; stream s holds, for each block k, its s-th picked
           state y_k,s at the positions of block k (position ids equal those of y*_k in the chain).
           data.context=clean (the reference's view): y_k,s sees the chain up to the start of block
           k and itself causally. data.context=noisy (Jacobi Forcing): y_k,s sees the pack's prompt
           (the chain before its first block), the noisy blocks y_<k,s of its own stream and itself
           causally; the clean blocks never see noisy ones and vice versa.
  target   local consistency only (clean context): the state after y_k,s, laid out like a student
  labels   ar_source=labels only: the ground-truth sequence, an independent causal segment
Another state of a block costs n tokens: the chain is shared by every stream.
The attention mask follows from two per-token integers built here and expanded inside jit:
`group` (0 chain, g > 0 a segment or a noisy stream, -1 padding) and `chain_limit` (how many chain
tokens the token sees): token i sees j iff (group[j] == 0 and j < chain_limit[i]) or
(group[j] == group[i] > 0 and j <= i). A noisy stream is one group laid out in block order, so
"its earlier blocks and itself causally" is just j <= i inside the group.

Consistency: the n + 1 prediction slots of each block (`states.slot_weights`). Slot j < n of a
student is predicted by student token j - 1, slot 0 by the token before the block in the student's
context (the chain's last prefix token, or under noisy context the previous noisy block's last
token); slot n by the block's last token. Target logits (global) are the chain's at the same
positions. Only the slots with a weight go into the row (`cons_*`), and only the chain positions with
an AR weight (`ar_*`): the step projects exactly those to the vocabulary.

With one block per prompt and clean context the loss equals the per-record loss; with several,
the AR term counts each chain token once instead of once per record that contains it. A prompt
that does not fit `max_seq_len` is split into several packs (each restarts with the block's
prefix, oldest tokens dropped if needed); under noisy context a pack also ends at a missing block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError
from cllm_jax.train.spec import BatchSpec, ar_sequence, ar_weights, chosen_pairs, record_rng, slot_weights

ROW_KEYS = {
    "tokens": ("T", np.int32),
    "positions": ("T", np.int32),
    "group": ("T", np.int32),
    "chain_limit": ("T", np.int32),
    "ar_index": ("K", np.int32),
    "ar_labels": ("K", np.int32),
    "ar_weights": ("K", np.float32),
    "cons_student": ("N", np.int32),
    "cons_target": ("N", np.int32),
    "cons_mask": ("N", np.float32),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pack:
    chain: tuple[int, ...]
    records: tuple[TrajectoryRecord, ...]
    prefix_lens: tuple[int, ...]  # where each record's block starts in the chain
    labels: tuple[int, ...] | None
    offset: int = 0  # tokens dropped from the front of the prompt's full sequence


def _segment_len(record: TrajectoryRecord, spec: BatchSpec) -> int:
    return record.block_size * spec.states_per_block * (2 if spec.consistency == "local" else 1)


@dataclasses.dataclass(kw_only=True)
class _Open:
    chain: list[int]
    offset: int  # tokens dropped from the front of the full sequence
    records: list[TrajectoryRecord]
    prefix_lens: list[int]
    labels: tuple[int, ...] | None
    used: int  # segment tokens so far


def _start(record: TrajectoryRecord, spec: BatchSpec) -> _Open:
    seg, n = _segment_len(record, spec), record.block_size
    labels = None
    if spec.ar_source == "labels":
        labels = ar_sequence(record, spec)[: max(spec.max_seq_len - seg - n - 1, 0)]
    budget = spec.max_seq_len - seg - len(labels or ())
    if budget < n + 1:
        raise ConfigError(f"data.max_seq_len={spec.max_seq_len} cannot hold a packed {n}-token block "
                          f"with its prefix; raise it")
    full = record.prompt_ids + record.fixed_point
    offset = max(0, len(full) - budget)
    return _Open(chain=list(full[offset:]), offset=offset, records=[record],
                 prefix_lens=[len(record.prompt_ids) - offset], labels=labels, used=seg)


def _try_add(pack: _Open, record: TrajectoryRecord, spec: BatchSpec) -> bool:
    full = record.prompt_ids + record.fixed_point
    start = len(record.prompt_ids) - pack.offset
    if start < 1:
        return False
    if spec.context == "noisy" and start != pack.prefix_lens[-1] + pack.records[-1].block_size:
        return False  # a missing block would leave a hole in the noisy context
    candidate = full[pack.offset:]
    common = min(len(candidate), len(pack.chain))
    if tuple(pack.chain[:common]) != tuple(candidate[:common]):
        return False  # not the same greedy output (another collection, or a changed prefix)
    chain_len = max(len(pack.chain), len(candidate))
    if chain_len + pack.used + _segment_len(record, spec) + len(pack.labels or ()) > spec.max_seq_len:
        return False
    if len(candidate) > len(pack.chain):
        pack.chain = list(candidate)
    pack.records.append(record)
    pack.prefix_lens.append(start)
    pack.used += _segment_len(record, spec)
    return True


def pack_records(records: Sequence[TrajectoryRecord], spec: BatchSpec) -> list[Pack]:
    """Group records by prompt (in order of first appearance), blocks in order, into packs."""
    by_prompt: dict = {}
    for r in records:
        by_prompt.setdefault(r.data_id, []).append(r)
    packs = []
    for group in by_prompt.values():
        current = None
        for r in sorted(group, key=lambda r: r.jacobian_itr_id):
            if current is None or not _try_add(current, r, spec):
                if current is not None:
                    packs.append(current)
                current = _start(r, spec)
        packs.append(current)
    return [Pack(chain=tuple(p.chain), records=tuple(p.records), prefix_lens=tuple(p.prefix_lens), labels=p.labels,
                 offset=p.offset) for p in packs]


def pack_row(pack: Pack, epoch: int, example: int, spec: BatchSpec) -> dict[str, np.ndarray]:
    chain = list(pack.chain)
    c, first = len(chain), pack.prefix_lens[0]
    tokens, positions, group, limit = list(chain), list(range(c)), [0] * c, list(range(1, c + 1))
    generated = max(pack.records[0].prompt_ids_len - pack.offset, 0)  # the prompt's end in the chain
    weights = ar_weights(chain, first, generated, spec) * (spec.ar_source == "teacher")
    ar_index = list(np.flatnonzero(weights))
    ar_labels = [chain[i + 1] for i in ar_index]
    ar_w = [1.0] * len(ar_index)
    student_idx, target_idx, mask = [], [], []
    next_group = 1

    def add_segment(ids: Sequence[int], start: int, g: int, sees: int) -> int:
        at = len(tokens)
        tokens.extend(ids)
        positions.extend(range(start, start + len(ids)))
        group.extend([g] * len(ids))
        limit.extend([sees] * len(ids))
        return at

    def new_group() -> int:
        nonlocal next_group
        next_group += 1
        return next_group - 1

    pairs = [chosen_pairs(r, record_rng(spec.seed, epoch, example, k), spec, epoch) for k, r in enumerate(pack.records)]
    noisy = spec.context == "noisy"
    for s in range(spec.states_per_block):
        stream = new_group() if noisy else None
        before = None  # under noisy context: the previous noisy block's last token
        for k, start in enumerate(pack.prefix_lens):
            student, target = pairs[k][s]
            n = len(student)
            s0 = add_segment(student, start, stream if noisy else new_group(), first if noisy else start)
            stud = [start - 1 if before is None else before] + [s0 + j - 1 for j in range(1, n + 1)]
            if spec.consistency == "global":
                tgt = [start - 1 + j for j in range(n + 1)]
            else:
                t0 = add_segment(target, start, new_group(), start)
                tgt = [start - 1] + [t0 + j - 1 for j in range(1, n + 1)]
            w = slot_weights(student, target, spec)
            kept = np.flatnonzero(w)
            student_idx += [stud[j] for j in kept]
            target_idx += [tgt[j] for j in kept]
            mask += list(w[kept])
            before = s0 + n - 1 if noisy else None
    if pack.labels is not None:
        labels = list(pack.labels)
        at = add_segment(labels, 0, new_group(), 0)
        lw = ar_weights(labels, pack.records[0].prompt_ids_len, pack.records[0].prompt_ids_len, spec)
        keep = np.flatnonzero(lw)
        ar_index += [at + i for i in keep]
        ar_labels += [labels[i + 1] for i in keep]
        ar_w += [1.0] * len(keep)
    row = {
        "tokens": tokens, "positions": positions, "group": group, "chain_limit": limit,
        "ar_index": ar_index, "ar_labels": ar_labels, "ar_weights": ar_w,
        "cons_student": student_idx, "cons_target": target_idx, "cons_mask": mask,
    }
    return {k: np.asarray(v, ROW_KEYS[k][1]) for k, v in row.items()}


def packed_attention_mask(group, chain_limit):
    """[..., T, T] boolean attention mask from `group` and `chain_limit` [..., T]."""
    t = group.shape[-1]
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    sees_chain = (group[..., None, :] == 0) & (j < chain_limit[..., :, None])
    same = (group[..., None, :] == group[..., :, None]) & (group[..., :, None] > 0) & (j <= i)
    return sees_chain | same
