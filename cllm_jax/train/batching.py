"""Trajectory records -> padded numpy training batches.

Two layouts (see also `packing.py`):
  per_record (the reference): one record per batch row and up to three sequences per row:
    student  prefix + y      (y: a trajectory state drawn uniformly among all but the fixed point)
    target   prefix + y'     (y' = y* for global consistency, the state after y for local); left out
                             when it equals the AR sequence (global + AR on the teacher output), so
                             the target comes from the AR forward pass: 2 forwards, not 3
    ar       prefix + y* (teacher output) or labels_ids (ground truth)
  packed (Jacobi Forcing style): one prompt's records per row in a single sequence.

Arrays are [grad_accum, batch, ...] and right-padded; weights/masks are 0 on padding. The state
drawn for a record depends only on (data.seed, epoch, example index), so the data position
(epoch, cursor) fully determines every batch: a resumed run sees exactly the same batches.
Inputs longer than `max_seq_len` lose the oldest prefix tokens (positions restart at 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    layout: str = "per_record"
    consistency: str = "global"
    ar_source: str = "teacher"
    max_seq_len: int = 1024
    pad_multiple: int = 64
    eos_id: int | None = None
    seed: int = 0
    shuffle: bool = True

    @property
    def shared_target(self) -> bool:
        """Per-record global consistency with AR on prefix + y*: the target is the AR sequence."""
        return self.layout == "per_record" and self.consistency == "global" and self.ar_source == "teacher"


@dataclasses.dataclass
class HostBatch:
    arrays: dict[str, np.ndarray]  # this process's rows, each [grad_accum, local batch, ...]
    global_shapes: dict[str, tuple[int, ...]]
    tokens: int  # real tokens fed through the model in the whole global batch
    examples: int  # real (non-empty) rows in the whole global batch


def record_rng(seed: int, epoch: int, example: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, example, k])


def after_eos(state: Sequence[int], eos_id: int | None) -> np.ndarray:
    """True at the positions strictly after the first EOS of `state`."""
    state = np.asarray(state)
    out = np.zeros(len(state), bool)
    if eos_id is not None:
        hits = np.flatnonzero(state == eos_id)
        if len(hits):
            out[hits[0] + 1:] = True
    return out


def block_loss_mask(student: Sequence[int], target: Sequence[int], eos_id: int | None = None) -> np.ndarray:
    """Which predictions of the block count: mask[j] = 1 for the logits predicting block token j.

    Tokens after the first EOS of a state are padding (the reference sets them to pad). Counting
    starts at the first position p where the student state differs from the target state and goes
    to the end of the block, except predictions of the student's padding. Equal states give 0.
    """
    s, t = np.asarray(student), np.asarray(target)
    s_pad, t_pad = after_eos(s, eos_id), after_eos(t, eos_id)
    diff = np.flatnonzero(np.where(s_pad, -1, s) != np.where(t_pad, -1, t))
    mask = np.zeros(len(s), np.float32)
    if len(diff):
        mask[diff[0]:] = 1.0
        mask[s_pad] = 0.0
    return mask


def choose_states(record: TrajectoryRecord, rng: np.random.Generator, consistency: str):
    """(student state y, target state): y uniform over all states but the fixed point."""
    states = record.answer_trajectory_ids
    if len(states) == 1:  # only the fixed point: nothing to learn, the mask will be empty
        return states[0], states[0]
    i = int(rng.integers(0, len(states) - 1))
    return states[i], (states[-1] if consistency == "global" else states[i + 1])


def ar_sequence(record: TrajectoryRecord, spec: BatchSpec) -> tuple[int, ...]:
    if spec.ar_source == "teacher":
        return record.prompt_ids + record.fixed_point  # = teacher_output_ids
    if record.labels_ids is None:
        raise DataError(f"record {record.data_id!r} block {record.jacobian_itr_id} has no labels_ids, "
                        f"needed by data.ar_source=labels (use ar_source=teacher or collect with labels)")
    return record.labels_ids[: spec.max_seq_len]


def _keep_prefix(record: TrajectoryRecord, spec: BatchSpec, extra: int) -> tuple[int, ...]:
    keep = spec.max_seq_len - extra
    if keep < 1:
        raise ConfigError(f"data.max_seq_len={spec.max_seq_len} leaves no room for the prefix of a "
                          f"{record.block_size}-token block; raise it")
    return record.prompt_ids[-keep:]


def record_lengths(record: TrajectoryRecord, spec: BatchSpec) -> tuple[int, int, int]:
    """(padded-array length needed, block size, tokens fed to the model) of a per-record row."""
    n = record.block_size
    seq = min(len(record.prompt_ids) + n, spec.max_seq_len)
    ar = seq if spec.ar_source == "teacher" else len(ar_sequence(record, spec))
    fed = seq + ar + (0 if spec.shared_target else seq)
    return max(seq, ar), n, fed


def record_row(record: TrajectoryRecord, rng: np.random.Generator, spec: BatchSpec) -> dict[str, np.ndarray]:
    student, target = choose_states(record, rng, spec.consistency)
    n = len(student)
    prefix = _keep_prefix(record, spec, n)
    row = {
        "student_tokens": np.asarray(prefix + student, np.int32),
        "cons_index": np.arange(n, dtype=np.int32) + len(prefix) - 1,
        "cons_mask": block_loss_mask(student, target, spec.eos_id),
    }
    if spec.ar_source == "teacher":
        ar = np.asarray(prefix + record.fixed_point, np.int32)
    else:
        ar = np.asarray(ar_sequence(record, spec), np.int32)
    if not spec.shared_target:
        row["target_tokens"] = np.asarray(prefix + target, np.int32)
    row["ar_tokens"] = ar
    row["ar_labels"] = np.append(ar[1:], 0).astype(np.int32)
    row["ar_weights"] = (np.arange(len(ar)) < len(ar) - 1).astype(np.float32)
    return row


PAD_VALUES = {"group": -1}  # padding tokens of a packed row belong to no group: they see nothing


def stack_rows(rows: list[dict | None], keys: dict[str, tuple[str, type]], dims: dict[str, int],
               shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """[A, B, dim] arrays from A*B rows (None = empty row), right-padded."""
    out = {k: np.full(shape + (dims[d],), PAD_VALUES.get(k, 0), dtype) for k, (d, dtype) in keys.items()}
    for i, row in enumerate(rows):
        if row is None:
            continue
        a, b = divmod(i, shape[1])
        for k in keys:
            out[k][a, b, : len(row[k])] = row[k]
    return out


def round_up(value: int, multiple: int, cap: int | None = None) -> int:
    value = -(-max(value, 1) // multiple) * multiple
    return value if cap is None else min(value, max(cap, 1))


class DataSource:
    """The training examples (records, or packs of records) and the batches of any data position."""

    def __init__(self, records: Sequence[TrajectoryRecord], spec: BatchSpec):
        self.spec = spec
        if not records:
            raise DataError("no trajectory records to train on: check data.trajectories")
        if spec.layout == "packed":
            from cllm_jax.train import packing
            self.examples = packing.pack_records(records, spec)
        else:
            self.examples = list(records)

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        if not self.spec.shuffle:
            return np.arange(len(self))
        return np.random.default_rng([self.spec.seed, epoch, 7]).permutation(len(self))

    def batch(self, epoch: int, cursor: int, shape: tuple[int, int], rows: slice | None = None) -> HostBatch:
        """The batch at (epoch, cursor): example slots order[cursor : cursor + A*B], past the end
        empty. Only rows `rows` of the batch axis are built (this process's share)."""
        accum, size = shape
        order = self.order(epoch)
        slots = [int(order[c]) if c < len(order) else -1 for c in range(cursor, cursor + accum * size)]
        rows = rows or slice(0, size)
        local_b = len(range(size)[rows])
        if self.spec.layout == "packed":
            from cllm_jax.train import packing
            lengths = [packing.pack_lengths(self.examples[s], self.spec) if s >= 0 else (1, 1, 0) for s in slots]
            keys = packing.ROW_KEYS
            build = lambda s: packing.pack_row(self.examples[s], epoch, s, self.spec)  # noqa: E731
        else:
            lengths = [record_lengths(self.examples[s], self.spec) if s >= 0 else (1, 1, 0) for s in slots]
            keys = {k: v for k, v in RECORD_KEYS.items() if not (k == "target_tokens" and self.spec.shared_target)}
            build = lambda s: record_row(self.examples[s], record_rng(self.spec.seed, epoch, s), self.spec)  # noqa: E731
        m = self.spec.pad_multiple
        dims = {"T": round_up(max(t for t, _, _ in lengths), m, self.spec.max_seq_len),
                "N": round_up(max(n for _, n, _ in lengths), 8 if self.spec.layout == "per_record" else m)}
        local_rows = []
        for a in range(accum):
            for b in range(size)[rows]:
                s = slots[a * size + b]
                local_rows.append(build(s) if s >= 0 else None)
        arrays = stack_rows(local_rows, keys, dims, (accum, local_b))
        global_shapes = {k: (accum, size) + v.shape[2:] for k, v in arrays.items()}
        return HostBatch(arrays, global_shapes, tokens=sum(f for _, _, f in lengths),
                         examples=sum(s >= 0 for s in slots))


RECORD_KEYS = {
    "student_tokens": ("T", np.int32),
    "target_tokens": ("T", np.int32),
    "ar_tokens": ("T", np.int32),
    "ar_labels": ("T", np.int32),
    "ar_weights": ("T", np.float32),
    "cons_index": ("N", np.int32),
    "cons_mask": ("N", np.float32),
}
