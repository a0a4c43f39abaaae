"""A placeholder drafter's acceptance read off the base model's own text: one forward, no decoding.

Lossless decoding commits the base model's AR text, and a pass's drafts come from the placeholders
after the last accepted token t: placeholder j predicts token t + 2 + j (the base model gives t + 1).
So whether the drafts of a pass anchored at t are right depends on the text alone, and every anchor
of the base model's continuation can be scored at once, in the layout the drafter is trained in
(cllm_jax/train/drafter.py): the text, then k placeholders per anchor, each group seeing the text up
to its anchor. A pass accepts draft i when drafts 1 .. i are all right; the share of anchors where
that holds, summed over i, is the mean accepted drafts over all anchors.

Decoding visits only the anchors its passes land on: a pass anchored at t that accepts a drafts
commits a + 1 tokens and anchors the next pass at t + 1 + a, so passes start where the drafter just
failed, which is harder text than the average anchor. Replaying that walk over the scored anchors
gives the drafter-alone tokens per pass that decoding measures (tests hold the two close; only the
first pass differs, whose drafts are guesses), at a fraction of the cost: a study can compare
drafters on many sequences in minutes, and on another domain than they were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cllm_jax.errors import ConfigError, DataError
from cllm_jax.train.drafter import ROW_KEYS, DrafterSpec, drafter_row, forward
from cllm_jax.train.spec import round_up, stack_rows


@jax.jit
def _drafts_right(model, micro: dict) -> jax.Array:
    """[B, P] bool: each placeholder's greedy draft equals the text's token."""
    _, draft_hidden = forward(model, micro)
    return jnp.argmax(model.logits(draft_hidden), axis=-1) == micro["labels"]


def draft_acceptance(model, sequences: Sequence[tuple[Sequence[int], int]], *, drafts: int,
                     batch_size: int = 1) -> dict:
    """Acceptance by draft position over every anchor of `sequences` ((prompt + the base model's
    continuation, prompt length) pairs) whose k = `drafts` labels all lie in the text.

    Returns {"anchors", "by_position" (share accepting drafts 1 .. i, i = 1 .. k), "mean_accepted"
    (over all anchors), "passes", "replayed_tpf" (the walk of decoding's passes)}.
    """
    adapter = getattr(model, "adapter", None)
    if adapter is None or adapter.placeholders is None:
        raise ConfigError("draft acceptance measures a placeholder drafter, and the model has none: load one "
                          "(--draft-adapter NAME|DIR)")
    if not 1 <= drafts <= adapter.placeholders.shape[0]:
        raise ConfigError(f"drafts must be 1 .. the drafter's {adapter.placeholders.shape[0]} placeholders, "
                          f"got {drafts}")
    longest = max((len(ids) for ids, _ in sequences), default=1)  # no text is cut: a long prompt keeps its drafts
    spec = DrafterSpec(placeholders=drafts, anchors=longest, decay=1.0, target="tokens", max_seq_len=longest,
                       pad_multiple=64, seed=0, shuffle=False)
    # every anchor: drafter_row draws min(anchors, available) of them, i.e. all, in order
    rows = [drafter_row(ids, length, np.random.default_rng(0), spec) for ids, length in sequences]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise DataError("no sequence is long enough to draft in: each needs at least 3 generated tokens")
    hits = np.zeros(drafts, np.int64)
    anchors = passes = tokens = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        dims = {"T": round_up(max(len(r["text"]) for r in chunk), 64),
                "P": round_up(max(len(r["anchor"]) for r in chunk), 64)}
        micro = {k: v[0] for k, v in stack_rows(chunk, ROW_KEYS, dims, (1, len(chunk))).items()}
        right = np.asarray(_drafts_right(model, micro))
        for row, row_right in zip(chunk, right):
            groups = len(row["anchor"]) // drafts
            inside = row["weights"][: groups * drafts].reshape(groups, drafts) > 0
            run = np.cumprod(row_right[: groups * drafts].reshape(groups, drafts) & inside, axis=1)
            full = inside.all(axis=1)  # counted by position only where every label lies in the text
            hits += run[full].sum(axis=0)
            anchors += int(full.sum())
            accepted = dict(zip(row["anchor"][::drafts].tolist(), run.sum(axis=1).tolist()))
            at, end = int(row["anchor"][0]), len(row["text"]) - 1  # the first pass commits the token at anchor + 1
            while at < end:
                passes, at = passes + 1, at + 1 + accepted.get(at, 0)
            tokens += end - int(row["anchor"][0])
    by_position = (hits / max(anchors, 1)).tolist()
    return {"anchors": anchors, "by_position": by_position, "mean_accepted": float(sum(by_position)),
            "passes": passes, "replayed_tpf": tokens / max(passes, 1)}
