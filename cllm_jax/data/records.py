"""The trajectory record: one block of one prompt, in the reference schema (the CLLM paper's released trainer reads it as is).

  data_id                      id of the prompt (PromptExample.data_id)
  jacobian_itr_id              block index k within the prompt (0, 1, ...)
  prompt_ids_len               length of the original prompt
  prompt_ids                   the grown prefix: prompt + the k converged blocks before this one
  answer_trajectory_ids        the block's states, each n ids; the last one is the fixed point
  teacher_output_ids           prompt_ids + fixed point
  complete_teacher_output_ids  the prompt's whole greedy generation (prompt + all blocks)
  labels_ids                   optional: prompt + ground-truth answer

The reference repository (hao-ai-lab/Consistency_LLM, data/generate_trajectory*.py and
cllm/utils.py) writes one JSON list with torch batch dims left in: data_id "data_3",
jacobian_itr_id "itr_0", prompt_ids [[...]] (or [[[...]]] for block 0), teacher_output_ids [[...]],
prompt_ids_len an int or [int] (data/generate_trajectory_gsm8k.py stores the grown prefix length
there instead), labels_ids [[...]] or flat. `from_json` accepts all of those and normalises to flat
tuples, an int block index and the original prompt length; `to_json` writes the flat form.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from cllm_jax.errors import DataError

def _flat_ids(value: Any, name: str) -> tuple[int, ...]:
    """Token ids as a flat tuple, peeling the reference's batch-of-one nesting ([[...]], [[[...]]])."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    while isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{name} must be a list of token ids, got {type(value).__name__}")
    out = []
    for t in value:
        if isinstance(t, (list, tuple)):
            raise DataError(f"{name} holds a batch of {len(value)} sequences; only batch size 1 is supported")
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise DataError(f"{name} must hold integer token ids, found {t!r}")
        out.append(int(t))
    return tuple(out)


def _int(value: Any, name: str, prefix: str = "") -> int:
    while isinstance(value, list) and len(value) == 1:  # the reference writes prompt_ids_len as [L]
        value = value[0]
    if isinstance(value, str) and prefix and value.startswith(prefix) and value[len(prefix):].isdigit():
        value = int(value[len(prefix):])  # "itr_3" -> 3
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an integer, got {value!r}")
    return int(value)


@dataclass(frozen=True, kw_only=True)
class TrajectoryRecord:
    data_id: str | int
    jacobian_itr_id: int
    prompt_ids_len: int
    prompt_ids: tuple[int, ...]
    answer_trajectory_ids: tuple[tuple[int, ...], ...]
    teacher_output_ids: tuple[int, ...]
    complete_teacher_output_ids: tuple[int, ...]
    labels_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        # Accept lists, numpy arrays and numpy ints from the decoder; store immutable plain ints.
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if isinstance(self.data_id, bool) or not isinstance(self.data_id, (str, int, np.integer)):
            raise DataError(f"data_id must be a string or an integer, got {self.data_id!r}")
        if isinstance(self.data_id, np.integer):
            set_("data_id", int(self.data_id))
        set_("jacobian_itr_id", _int(self.jacobian_itr_id, "jacobian_itr_id", "itr_"))
        set_("prompt_ids_len", _int(self.prompt_ids_len, "prompt_ids_len"))
        for name in ("prompt_ids", "teacher_output_ids", "complete_teacher_output_ids"):
            set_(name, _flat_ids(getattr(self, name), name))
        if self.labels_ids is not None:
            set_("labels_ids", _flat_ids(self.labels_ids, "labels_ids"))
        states = self.answer_trajectory_ids
        if isinstance(states, np.ndarray):
            states = states.tolist()
        states = tuple(_flat_ids(s, f"answer_trajectory_ids[{i}]") for i, s in enumerate(states))
        if not states or len({len(s) for s in states}) != 1 or not states[0]:
            raise DataError("answer_trajectory_ids must hold at least one state, all of the same "
                            f"non-zero length (got lengths {[len(s) for s in states]})")
        set_("answer_trajectory_ids", states)
        n, k = len(states[0]), self.jacobian_itr_id
        if k > 0 and self.prompt_ids_len == len(self.prompt_ids) > k * n:
            # The reference's GSM8K script stores the grown prefix length; every block adds n ids.
            set_("prompt_ids_len", len(self.prompt_ids) - k * n)
        if self.jacobian_itr_id < 0 or not 0 < self.prompt_ids_len <= len(self.prompt_ids):
            raise DataError(f"inconsistent record: jacobian_itr_id={self.jacobian_itr_id}, "
                            f"prompt_ids_len={self.prompt_ids_len}, len(prompt_ids)={len(self.prompt_ids)}")

    @property
    def block_size(self) -> int:
        return len(self.answer_trajectory_ids[0])

    @property
    def fixed_point(self) -> tuple[int, ...]:
        return self.answer_trajectory_ids[-1]

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("prompt_ids", "teacher_output_ids", "complete_teacher_output_ids"):
            out[name] = list(out[name])
        out["answer_trajectory_ids"] = [list(s) for s in self.answer_trajectory_ids]
        if self.labels_ids is None:
            del out["labels_ids"]  # like the reference without use_labels
        else:
            out["labels_ids"] = list(self.labels_ids)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "TrajectoryRecord":
        """From our JSON or the reference's (nested ids, "data_0", "itr_0"); unknown keys ignored."""
        if not isinstance(d, dict):
            raise DataError(f"a trajectory record must be a JSON object, got {type(d).__name__}")
        required = [f.name for f in fields(cls) if f.name != "labels_ids"]
        missing = [k for k in required if k not in d]
        if missing:
            raise DataError(f"record lacks {', '.join(missing)} (has {', '.join(map(str, d))})")
        return cls(**{k: d[k] for k in required}, labels_ids=d.get("labels_ids"))
