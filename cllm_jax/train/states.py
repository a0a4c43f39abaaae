"""Which trajectory states a block trains on, and which of their predictions count.

Pure numpy functions of one record, shared by both batch layouts (`batching.py`, `packing.py`).

Noise of a state (Jacobi Forcing, arXiv 2512.14681): (n - first mismatch with the fixed point) / n,
the share of the block that has not converged yet; the fixed point itself has noise 0.

Schedules (`data.noise_schedule`) pick `states_per_block` states among all but the fixed point:
  uniform      uniformly at random, without repeats (the reference; one state = today's draw)
  progressive  the targets linspace(noise_min, noise_max, w) go to the blocks of a sequence
               cyclically: block k gets target k mod w (a sawtooth over the sequence); the state
               nearest the target is taken, ties to the earlier state. Epoch e shifts the sawtooth
               by e (target (k + e) mod w): epoch 0 is Jacobi Forcing's single epoch, and several
               epochs reach other states instead of repeating the same ones (with 8 blocks of 16
               tokens and w = 16, one epoch never gives a block a noise above 0.47)
  reverse      the same with the targets in decreasing order (an ablation of the ordering)
  random       the target index drawn at random per block and epoch (same targets, no ordering)
With S states per block, state s of block k aims at target index (k + e + s * w // S) mod w: the S
targets are spread evenly around the window, so one block contributes an early, a middle and a late
state instead of three neighbours. Each pick is the nearest state not
picked yet; a block with fewer than S noisy states fills the rest with its fixed point, whose loss
mask is empty (it still gives the noisy-context blocks after it a context to look at).

Prediction slots of a block (n + 1 of them): slot j < n is the prediction of block token j (made by
the token before it), slot n the prediction of the token after the block (made by the block's last
token). Which slots count (`slot_weights`), p the first mismatch of student and target:
  tokens  (the reference) slots p .. n-1, each weight 1: the loss is a mean over the tokens of a batch
  blocks  (Jacobi Forcing) slots p+1 .. n, each weight 1/count: a mean per block, then over blocks.
          Slot p is left out because its context equals the target's (zero gradient); slot n is the
          next block's first token, the prediction that makes rolling and multiblock decoding jump.
Only an EOS in the target ends the block: its slots after the target's EOS do not count. A spurious
EOS in the student (initial guesses come from the prompt, which holds `<|im_end|>`) is just a wrong
token. `student_eos_pads=True` restores the reference: the student's tokens after its first EOS are
padding, never predicted (`block_loss_mask`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cllm_jax.data.trajectories import TrajectoryRecord


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
    """The reference's mask over the n block-token slots: mask[j] = 1 for the logits predicting token j.

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


def target_end(target: Sequence[int], eos_id: int | None) -> int:
    """Number of target tokens that count: up to and including its first EOS, else all n."""
    return len(target) - int(after_eos(target, eos_id).sum())


def first_mismatch(student: Sequence[int], target: Sequence[int], eos_id: int | None = None) -> int:
    """First position < target_end where the states differ; target_end if none (converged)."""
    end = target_end(target, eos_id)
    diff = np.flatnonzero(np.asarray(student)[:end] != np.asarray(target)[:end])
    return int(diff[0]) if len(diff) else end


def noise(state: Sequence[int], fixed_point: Sequence[int], eos_id: int | None = None) -> float:
    """(n - first mismatch) / n; 0 for a state equal to the fixed point (up to its EOS)."""
    n, p = len(fixed_point), first_mismatch(state, fixed_point, eos_id)
    return (n - p) / n if p < target_end(fixed_point, eos_id) else 0.0


def slot_weights(student: Sequence[int], target: Sequence[int], eos_id: int | None, norm: str = "blocks",
                 student_eos_pads: bool = False) -> np.ndarray:
    """Loss weights of the n + 1 prediction slots of a block (see the module docstring)."""
    n = len(target)
    out = np.zeros(n + 1, np.float32)
    if student_eos_pads:
        out[:n] = block_loss_mask(student, target, eos_id)
        if norm == "blocks":
            out[np.argmax(out > 0)] = 0.0  # the first kept slot: context equal to the target's
    else:
        end = target_end(target, eos_id)
        p = first_mismatch(student, target, eos_id)
        if p < end:
            last = end - 1 if end < n or norm == "tokens" else n  # inclusive; slot n only without EOS
            out[p + (norm == "blocks"): last + 1] = 1.0
    if norm == "blocks" and out.sum() > 0:
        out /= out.sum()
    return out


def schedule_targets(schedule: str, window: int, low: float, high: float) -> np.ndarray:
    targets = np.linspace(low, high, window)
    return targets[::-1] if schedule == "reverse" else targets


def pick_states(record: TrajectoryRecord, rng: np.random.Generator, schedule: str = "uniform", *, count: int = 1,
                window: int = 16, low: float = 0.0, high: float = 1.0, eos_id: int | None = None,
                epoch: int = 0) -> list[int]:
    """Indices into record.answer_trajectory_ids of the `count` states to train on (see the module
    docstring); the fixed point's index fills the places no noisy state is left for."""
    states = record.answer_trajectory_ids
    fixed, candidates = len(states) - 1, len(states) - 1
    if schedule == "uniform":
        if candidates == 0:
            picks = []
        elif count == 1:
            picks = [int(rng.integers(0, candidates))]  # today's draw, bit for bit
        else:
            picks = [int(i) for i in rng.choice(candidates, min(count, candidates), replace=False)]
    else:
        targets = schedule_targets(schedule, window, low, high)
        levels = np.asarray([noise(s, states[-1], eos_id) for s in states[:-1]])
        k0 = int(rng.integers(0, window)) if schedule == "random" else record.jacobian_itr_id + epoch
        picks = []
        for s in range(min(count, candidates)):
            gap = np.abs(levels - targets[(k0 + s * window // count) % window])
            gap[picks] = np.inf  # distinct states
            picks.append(int(np.argmin(gap)))  # argmin: the first of equal gaps, the earlier state
    return picks + [fixed] * (count - len(picks))


def state_pairs(record: TrajectoryRecord, picks: Sequence[int], consistency: str):
    """(student, target) per picked index: target = the fixed point (global) or the next state."""
    states = record.answer_trajectory_ids
    return [(states[i], states[-1] if consistency == "global" else states[min(i + 1, len(states) - 1)])
            for i in picks]
