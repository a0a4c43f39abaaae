"""The batch settings and the helpers both layouts share (`batching.py` uses `packing.py`; both use
this module and `states.py`, so the imports run one way).

AR targets (`ar_weights`): a sequence's position i predicts token i + 1 and counts unless
  - ar_on_prompt is off and token i + 1 lies before `train_from` (the prompt, and in the packed
    layout also the blocks an earlier pack of the same prompt already counts), or
  - ar_after_eos is off and token i + 1 lies after the first EOS of the generated part (the EOS
    itself counts: the model must learn to stop; the prompt's own `<|im_end|>` is not the end).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord
from cllm_jax.errors import ConfigError, DataError
from cllm_jax.train import states as states_lib
from cllm_jax.train.config import DataSection, LossSection, TrainConfig, config_from_dict


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchSpec:
    """What batching reads of a training config: its data and loss sections and the resolved EOS.

    `spec.layout`, `spec.consistency`, ...: the key of whichever section declares it
    (cllm_jax/train/config.py documents each one and is the one place values are checked).
    """

    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    eos_id: int | None = None  # resolved: the model's EOS, or None for no EOS handling

    @classmethod
    def from_config(cls, config: TrainConfig, eos_id: int | None) -> "BatchSpec":
        return cls(data=config.data, loss=config.loss, eos_id=eos_id)

    @classmethod
    def of(cls, eos_id: int | None = None, **keys) -> "BatchSpec":
        """A spec from keys of either section, checked as a training config's are (tests, benchmarks)."""
        data_keys = {f.name for f in dataclasses.fields(DataSection)}
        sections = {"data": {k: v for k, v in keys.items() if k in data_keys},
                    "loss": {k: v for k, v in keys.items() if k not in data_keys}}
        return cls.from_config(config_from_dict(sections), eos_id)

    def replace(self, **keys) -> "BatchSpec":
        data_keys = {f.name for f in dataclasses.fields(DataSection)}
        return BatchSpec(data=dataclasses.replace(self.data, **{k: v for k, v in keys.items() if k in data_keys}),
                         loss=dataclasses.replace(self.loss, **{k: v for k, v in keys.items() if k not in data_keys}),
                         eos_id=self.eos_id)

    def __getattr__(self, name: str):
        for section in (self.data, self.loss):
            if name in section.__dataclass_fields__:
                return getattr(section, name)
        raise AttributeError(f"BatchSpec has no key {name!r}")

    @property
    def shared_target(self) -> bool:
        """Per-record global consistency with AR on prefix + y*: the target is the AR sequence."""
        return self.layout == "per_record" and self.consistency == "global" and self.ar_source == "teacher"


def record_rng(seed: int, epoch: int, example: int, k: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, example, k])


def chosen_pairs(record: TrajectoryRecord, rng: np.random.Generator, spec: BatchSpec, epoch: int = 0):
    """The (student, target) state pairs a record trains on under `spec` in `epoch`."""
    picks = states_lib.pick_states(record, rng, spec.noise_schedule, count=spec.states_per_block,
                                   window=spec.noise_window, low=spec.noise_min, high=spec.noise_max,
                                   eos_id=spec.eos_id, epoch=epoch)
    return states_lib.state_pairs(record, picks, spec.consistency)


def slot_weights(student, target, spec: BatchSpec) -> np.ndarray:
    return states_lib.slot_weights(student, target, spec.eos_id, spec.consistency_norm, spec.student_eos_pads)


def ar_sequence(record: TrajectoryRecord, spec: BatchSpec) -> tuple[int, ...]:
    if spec.ar_source == "teacher":
        return record.prompt_ids + record.fixed_point  # = teacher_output_ids
    if record.labels_ids is None:
        raise DataError(f"record {record.data_id!r} block {record.jacobian_itr_id} has no labels_ids, "
                        f"needed by data.ar_source=labels (use ar_source=teacher or collect with labels)")
    return record.labels_ids[: spec.max_seq_len]


def ar_weights(seq: Sequence[int], train_from: int, eos_from: int, spec: BatchSpec) -> np.ndarray:
    """Weights of positions 0..len-1 of `seq` (position i predicts seq[i + 1]; the last predicts nothing)."""
    target = np.arange(1, len(seq) + 1)  # index of the token each position predicts
    keep = target < len(seq)
    if not spec.ar_on_prompt:
        keep &= target >= train_from
    if not spec.ar_after_eos and spec.eos_id is not None:
        hits = np.flatnonzero(np.asarray(seq[max(eos_from, 0):], dtype=np.int64) == spec.eos_id)
        if len(hits):
            keep &= target <= max(eos_from, 0) + hits[0]
    return keep.astype(np.float32)


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


def example_order(seed: int, epoch: int, count: int, shuffle: bool = True) -> np.ndarray:
    """The order of `count` training examples in `epoch`: a pure function of (seed, epoch), so a resumed
    run sees the same batches."""
    if not shuffle:
        return np.arange(count)
    return np.random.default_rng([seed, epoch, 7]).permutation(count)


def round_up(value: int, multiple: int, cap: int | None = None) -> int:
    value = -(-max(value, 1) // multiple) * multiple
    return value if cap is None else min(value, max(cap, 1))


def bucket(value: int, minimum: int) -> int:
    """The next power-of-two multiple of `minimum`: few distinct shapes, so few recompilations."""
    size = max(minimum, 1)
    while size < value:
        size *= 2
    return size
