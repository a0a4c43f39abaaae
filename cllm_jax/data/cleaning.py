"""Cleaning collected records: drop blocks whose generation collapsed into repetition (the reference's rule)."""

from __future__ import annotations

from typing import Iterable, Sequence

from cllm_jax.data.records import TrajectoryRecord


def has_repetition(ids: Sequence[int], eos_id: int | None, run: int = 10) -> bool:
    """True if `run` identical tokens follow each other before the first EOS (repetition collapse)."""
    count, prev = 0, None
    for t in ids:
        if eos_id is not None and t == eos_id:
            break
        count = count + 1 if t == prev else 1
        if count >= run:
            return True
        prev = t
    return False


def drop_repetitive(records: Iterable[TrajectoryRecord], eos_id: int | None,
                    run: int = 10) -> tuple[list[TrajectoryRecord], int]:
    """(kept records, number dropped): a record goes if its generated output so far repeats.

    The output checked is teacher_output_ids after the original prompt, so a prompt that itself
    holds ten equal tokens (SmolLM2 splits numbers into digits: "10000000000") is not held against it.
    """
    kept, dropped = [], 0
    for r in records:
        if has_repetition(r.teacher_output_ids[r.prompt_ids_len:], eos_id, run):
            dropped += 1
        else:
            kept.append(r)
    return kept, dropped
