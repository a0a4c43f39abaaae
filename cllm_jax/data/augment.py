"""Extra training states for a trajectory (the reference's `use_aug`), and the per-prompt random stream."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def augment_trajectory(states: Sequence[Sequence[int]], rng: np.random.Generator) -> list[list[int]]:
    """The reference's `use_aug`: extra, partly corrected states, placed before the originals.

    For every state j but the last two (the last is the fixed point y*): let w be its positions
    that differ from y*. If len(w) >= 2, pick k uniformly in [1, len(w) - 1] (mean len(w)/2, i.e.
    about half), choose k distinct positions among w[1:] and set them to y*'s tokens. The first
    wrong position always stays wrong, so the new state is still a genuine not-yet-converged state
    and the consistency loss (which starts at the first wrong token) sees the same boundary.
    Returns [augmented states in increasing j] + [the original states]; the last is still y*.

    Source: data/generate_trajectory*.py in hao-ai-lab/Consistency_LLM draws k with
    `random.sample(range(1, len(w)), 1)` and prepends the result. Its loop then overwrites the
    copy on every pick (so only one token gets corrected), may pick the first wrong token, and
    skips states as its indices shift under `insert(0, ...)`. We implement the stated intent.
    """
    states = [list(map(int, s)) for s in states]
    if not states:
        return []
    fixed = np.asarray(states[-1])
    augmented = []
    for state in states[:-2]:
        wrong = np.flatnonzero(np.asarray(state) != fixed)
        if len(wrong) < 2:
            continue
        k = int(rng.integers(1, len(wrong)))  # 1 .. len(wrong)-1
        fix = rng.choice(wrong[1:], size=k, replace=False)
        new = np.asarray(state)
        new[fix] = fixed[fix]
        augmented.append(new.tolist())
    return augmented + states


def prompt_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of prompt `index`: independent of sharding and of where a run resumed."""
    return np.random.default_rng([seed, index])
