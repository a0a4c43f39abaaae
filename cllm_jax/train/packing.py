"""The packed layout: all blocks of a prompt trained in one forward and one backward pass.

After Jacobi Forcing (arXiv 2512.14681). One row holds, in this order:
  chain    the prompt followed by the converged blocks y*_0, y*_1, ... (the greedy output); it is
           causal, and doubles as the teacher-output AR sequence and as the global target
  student  for each block k, a state y_k drawn from its trajectory, at the positions of block k
           (position ids equal those of y*_k in the chain); it sees the chain up to the start of
           block k (the block's prefix) and itself causally, nothing else
  target   local consistency only: the state after y_k, laid out like the student segment
  labels   ar_source=labels only: the ground-truth sequence, an independent causal segment
The attention mask follows from two per-token integers built here and expanded inside jit:
`group` (0 chain, g > 0 a segment, -1 padding) and `chain_limit` (how many chain tokens the token
sees): token i sees j iff (group[j] == 0 and j < chain_limit[i]) or (group[j] == group[i] > 0 and
j <= i). So each student block computes exactly what the per-record layout computes on prefix + y_k.

Consistency predictions of block k: token j of the block is predicted by the chain's last prefix
token (j = 0) or by student token j - 1; the target logits are the chain's (global) at the same
positions. The loss mask is `block_loss_mask`, as per record. With one block per prompt the loss
equals the per-record loss; with several, the AR term counts each chain token once instead of once
per record that contains it. A prompt that does not fit `max_seq_len` is split into several packs
(each restarts with the block's prefix, oldest tokens dropped if needed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError
from cllm_jax.train.batching import BatchSpec, ar_sequence, block_loss_mask, choose_states, record_rng

ROW_KEYS = {
    "tokens": ("T", np.int32),
    "positions": ("T", np.int32),
    "group": ("T", np.int32),
    "chain_limit": ("T", np.int32),
    "ar_labels": ("T", np.int32),
    "ar_weights": ("T", np.float32),
    "cons_student": ("N", np.int32),
    "cons_target": ("N", np.int32),
    "cons_mask": ("N", np.float32),
}


@dataclasses.dataclass(frozen=True)
class Pack:
    chain: tuple[int, ...]
    records: tuple[TrajectoryRecord, ...]
    prefix_lens: tuple[int, ...]  # where each record's block starts in the chain
    labels: tuple[int, ...] | None


def _segment_len(record: TrajectoryRecord, spec: BatchSpec) -> int:
    return record.block_size * (2 if spec.consistency == "local" else 1)


@dataclasses.dataclass
class _Open:
    chain: list[int]
    offset: int  # tokens dropped from the front of the full sequence
    records: list[TrajectoryRecord]
    prefix_lens: list[int]
    labels: tuple[int, ...] | None
    used: int  # segment tokens so far

    def length(self) -> int:
        return len(self.chain) + self.used + len(self.labels or ())


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
    return _Open(list(full[offset:]), offset, [record], [len(record.prompt_ids) - offset], labels, seg)


def _try_add(pack: _Open, record: TrajectoryRecord, spec: BatchSpec) -> bool:
    full = record.prompt_ids + record.fixed_point
    start = len(record.prompt_ids) - pack.offset
    if start < 1:
        return False
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
    return [Pack(tuple(p.chain), tuple(p.records), tuple(p.prefix_lens), p.labels) for p in packs]


def pack_lengths(pack: Pack, spec: BatchSpec) -> tuple[int, int, int]:
    """(sequence length, consistency slots, tokens fed to the model) of a pack."""
    length = len(pack.chain) + sum(_segment_len(r, spec) for r in pack.records) + len(pack.labels or ())
    return length, sum(r.block_size for r in pack.records), length


def pack_row(pack: Pack, epoch: int, example: int, spec: BatchSpec) -> dict[str, np.ndarray]:
    chain = list(pack.chain)
    c = len(chain)
    tokens, positions, group, limit = list(chain), list(range(c)), [0] * c, list(range(1, c + 1))
    ar_labels = chain[1:] + [0]
    ar_weights = [1.0 if spec.ar_source == "teacher" else 0.0] * (c - 1) + [0.0]
    student_idx, target_idx, mask = [], [], []
    next_group = 1

    def add_segment(ids: Sequence[int], start: int) -> int:
        nonlocal next_group
        first = len(tokens)
        tokens.extend(ids)
        positions.extend(range(start, start + len(ids)))
        group.extend([next_group] * len(ids))
        limit.extend([start] * len(ids))
        ar_labels.extend([0] * len(ids))
        ar_weights.extend([0.0] * len(ids))
        next_group += 1
        return first

    for k, (record, start) in enumerate(zip(pack.records, pack.prefix_lens)):
        student, target = choose_states(record, record_rng(spec.seed, epoch, example, k), spec.consistency)
        n = len(student)
        s0 = add_segment(student, start)
        student_idx += [start - 1] + [s0 + j - 1 for j in range(1, n)]
        if spec.consistency == "global":
            target_idx += [start - 1 + j for j in range(n)]
        else:
            t0 = add_segment(target, start)
            target_idx += [start - 1] + [t0 + j - 1 for j in range(1, n)]
        mask.append(block_loss_mask(student, target, spec.eos_id))
    if pack.labels is not None:
        first = add_segment(pack.labels, 0)
        limit[first:] = [0] * len(pack.labels)
        ar_labels[first:] = list(pack.labels[1:]) + [0]
        ar_weights[first:] = [1.0] * (len(pack.labels) - 1) + [0.0]
    row = {
        "tokens": tokens, "positions": positions, "group": group, "chain_limit": limit,
        "ar_labels": ar_labels, "ar_weights": ar_weights,
        "cons_student": student_idx, "cons_target": target_idx, "cons_mask": np.concatenate(mask),
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
