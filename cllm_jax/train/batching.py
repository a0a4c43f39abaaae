"""Trajectory records -> padded numpy training batches.

Two layouts:
  per_record (the reference): one record per batch row and up to three sequences per row:
    student  prefix + y      (y: a trajectory state picked by the noise schedule, never the fixed point)
    target   prefix + y'     (y' = y* for global consistency, the state after y for local); left out
                             when it equals the AR sequence (global + AR on the teacher output), so
                             the target comes from the AR forward pass: 2 forwards, not 3
    ar       prefix + y* (teacher output) or labels_ids (ground truth)
  packed (Jacobi Forcing style, `packing.py`): one prompt's records per row in a single sequence.
Which states and which predictions count: `states.py`; the AR targets and settings: `spec.py`.

Arrays are [grad_accum, batch, ...] and right-padded; weights/masks are 0 on padding. The states
drawn for a record depend only on (data.seed, epoch, example index), so the data position
(epoch, cursor) fully determines every batch: a resumed run sees exactly the same batches.
Inputs longer than `max_seq_len` lose the oldest prefix tokens (positions restart at 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError, DataError
from cllm_jax.train import packing
from cllm_jax.train.spec import (BatchSpec, ar_sequence, ar_weights, bucket, chosen_pairs, example_order, record_rng,
                                 round_up, slot_weights, stack_rows)

__all__ = ["BatchSpec", "DataSource", "HostBatch", "RECORD_KEYS", "record_row", "record_rng"]


@dataclasses.dataclass
class HostBatch:
    arrays: dict[str, np.ndarray]  # this process's rows, each [grad_accum, local batch, ...]
    global_shapes: dict[str, tuple[int, ...]]
    tokens: int  # real tokens fed through the model in the whole global batch
    examples: int  # real (non-empty) rows in the whole global batch




def _keep_prefix(record: TrajectoryRecord, spec: BatchSpec, extra: int) -> tuple[int, ...]:
    keep = spec.max_seq_len - extra
    if keep < 1:
        raise ConfigError(f"data.max_seq_len={spec.max_seq_len} leaves no room for the prefix of a "
                          f"{record.block_size}-token block; raise it")
    return record.prompt_ids[-keep:]


def record_row(record: TrajectoryRecord, rng: np.random.Generator, spec: BatchSpec,
               epoch: int = 0) -> dict[str, np.ndarray]:
    """One per-record row; its n + 1 consistency slots are those of `states.slot_weights`."""
    [(student, target)] = chosen_pairs(record, rng, spec, epoch)
    n = len(student)
    prefix = _keep_prefix(record, spec, n)
    row = {
        "student_tokens": np.asarray(prefix + student, np.int32),
        "cons_index": np.arange(n + 1, dtype=np.int32) + len(prefix) - 1,
        "cons_mask": slot_weights(student, target, spec),
    }
    if spec.ar_source == "teacher":
        ar = np.asarray(prefix + record.fixed_point, np.int32)
        # AR on this block's tokens only when the prompt is off: earlier blocks are other records'
        generated = len(prefix) - (len(record.prompt_ids) - record.prompt_ids_len)
        weights = ar_weights(ar, len(prefix), generated, spec)
    else:
        ar = np.asarray(ar_sequence(record, spec), np.int32)
        weights = ar_weights(ar, record.prompt_ids_len, record.prompt_ids_len, spec)
    if not spec.shared_target:
        row["target_tokens"] = np.asarray(prefix + target, np.int32)
    row["ar_tokens"] = ar
    row["ar_labels"] = np.append(ar[1:], 0).astype(np.int32)
    row["ar_weights"] = weights
    return row


RECORD_KEYS = {
    "student_tokens": ("T", np.int32),
    "target_tokens": ("T", np.int32),
    "ar_tokens": ("T", np.int32),
    "ar_labels": ("T", np.int32),
    "ar_weights": ("T", np.float32),
    "cons_index": ("N", np.int32),
    "cons_mask": ("N", np.float32),
}
_FED = ("tokens", "student_tokens", "target_tokens", "ar_tokens")  # the sequences a row runs through the model


class DataSource:
    """The training examples (records, or packs of records) and the batches of any data position."""

    def __init__(self, records: Sequence[TrajectoryRecord], spec: BatchSpec):
        self.spec = spec
        if not records:
            raise DataError("no trajectory records to train on: check data.trajectories")
        self.examples = packing.pack_records(records, spec) if spec.layout == "packed" else list(records)

    def __len__(self) -> int:
        return len(self.examples)

    def order(self, epoch: int) -> np.ndarray:
        return example_order(self.spec.seed, epoch, len(self), self.spec.shuffle)

    def row(self, epoch: int, slot: int) -> dict[str, np.ndarray]:
        if self.spec.layout == "packed":
            return packing.pack_row(self.examples[slot], epoch, slot, self.spec)
        return record_row(self.examples[slot], record_rng(self.spec.seed, epoch, slot), self.spec, epoch)

    def batch(self, epoch: int, cursor: int, shape: tuple[int, int], rows: slice | None = None) -> HostBatch:
        """The batch at (epoch, cursor): example slots order[cursor : cursor + A*B], past the end
        empty. Only rows `rows` of the batch axis are returned (this process's share); every
        process builds all rows (cheap numpy) so that all agree on the padded shapes."""
        accum, size = shape
        order = self.order(epoch)
        slots = [int(order[c]) if c < len(order) else -1 for c in range(cursor, cursor + accum * size)]
        built = [self.row(epoch, s) if s >= 0 else None for s in slots]
        if self.spec.layout == "packed":
            keys = packing.ROW_KEYS
        else:
            keys = {k: v for k, v in RECORD_KEYS.items() if not (k == "target_tokens" and self.spec.shared_target)}
        longest = {d: max((len(r[k]) for r in built if r is not None for k, (dk, _) in keys.items() if dk == d),
                          default=1) for d, _ in set(keys.values())}
        m = self.spec.pad_multiple
        dims = {"T": round_up(longest["T"], m, self.spec.max_seq_len)}
        if self.spec.layout == "packed":  # gather sizes: powers of two, few shapes to compile
            dims |= {"K": bucket(longest["K"], m), "N": bucket(longest["N"], m)}
        else:
            dims["N"] = round_up(longest["N"], 8)
        rows = rows or slice(0, size)
        local_b = len(range(size)[rows])
        local = [built[a * size + b] for a in range(accum) for b in range(size)[rows]]
        arrays = stack_rows(local, keys, dims, (accum, local_b))
        global_shapes = {k: (accum, size) + v.shape[2:] for k, v in arrays.items()}
        return HostBatch(arrays, global_shapes, tokens=sum(len(r[k]) for r in built if r is not None
                                                           for k in _FED if k in r),
                         examples=sum(s >= 0 for s in slots))
