"""Sharded collection: which prompts a shard holds, and merging the shards into one directory.

Order, and why merge == unsharded: an unsharded run writes prompts in increasing position i; shard
s of c holds positions i with i % c == s, also in increasing order. `merge_shards` sorts the
prompt groups of all shards by i and copies their record bytes verbatim, which reproduces the
unsharded trajectories.jsonl byte for byte (and its progress.jsonl and summary.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from cllm_jax.data.storage import (PROGRESS_FILE, SUMMARY_FILE, TRAJECTORIES_FILE, Group, read_summary, scan_directory,
                                   summary_bytes, write_atomic, writing)
from cllm_jax.errors import ConfigError, DataError, describe_differences


def shard_examples(examples: Sequence, index: int, count: int) -> list[tuple[int, Any]]:
    """(position, example) pairs of shard `index` of `count`: position i goes to shard i % count.

    The position is what `TrajectoryWriter.write_prompt` takes as `index`; an unsharded run is
    shard 0 of 1.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index} of {count}: need count >= 1 and 0 <= index < count")
    return [(i, ex) for i, ex in enumerate(examples) if i % count == index]


def _check_shards(dirs: list[Path]) -> list[dict]:
    summaries = []
    for d in dirs:
        s = read_summary(d)
        if s is None:
            raise DataError(f"{d}: no {SUMMARY_FILE}; not a collection directory")
        summaries.append(s)
    if not summaries:
        raise DataError("merge_shards needs at least one shard directory")
    fingerprint = summaries[0]["fingerprint"]
    for d, s in zip(dirs, summaries):
        if s["fingerprint"] != fingerprint:
            raise DataError(f"{d} was collected with other settings than {dirs[0]} "
                            f"({describe_differences(fingerprint, s['fingerprint'])}); only shards of one run merge")
        if not s.get("shard"):
            raise DataError(f"{d} is not a shard (it was collected unsharded)")
        if not s.get("complete"):
            raise DataError(f"{d} is incomplete; resume that shard with the same command first")
    count = summaries[0]["shard"]["count"]
    found = sorted(s["shard"]["index"] for s in summaries)
    if any(s["shard"]["count"] != count for s in summaries) or found != list(range(count)):
        raise DataError(f"shards {found} given, need each of 0..{count - 1} exactly once")
    return summaries


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Merge complete shard directories into `out_dir`, identical to an unsharded run's output.

    Returns the merged summary. Every shard must come from the same fingerprint, all `count`
    shards must be present once, each complete, and together cover positions 0..N-1. Shards of
    either format merge into a format /2 directory.
    """
    dirs = [Path(d) for d in shard_dirs]
    summaries = _check_shards(dirs)
    pieces: list[tuple[Path, Group]] = []
    for d, s in zip(dirs, summaries):
        scan = scan_directory(d, s)
        if scan.keep != scan.size or scan.progress_keep != scan.progress_size:
            raise DataError(f"{d} ends in a half-written prompt; resume that shard first")
        pieces += [(d / TRAJECTORIES_FILE, g) for g in scan.groups]
    pieces.sort(key=lambda p: p[1].index)
    positions = [g.index for _, g in pieces]
    if positions != list(range(len(positions))):
        missing = sorted(set(range(max(positions, default=-1) + 1)) - set(positions))[:10]
        raise DataError(f"merged shards do not cover prompt positions 0..N-1 exactly once (missing "
                        f"{missing}, or repeated); were the shards collected from one prompt list?")

    out_dir = Path(out_dir)
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / TRAJECTORIES_FILE
    if target.exists() or (out_dir / SUMMARY_FILE).exists():
        raise DataError(f"{out_dir} already holds a collection; merge into a new directory")
    tmp = target.with_name(target.name + ".tmp")
    handles: dict[Path, Any] = {}
    merged: list[Group] = []
    try:
        with writing(tmp), open(tmp, "wb") as out:
            for path, g in pieces:
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                f.seek(g.start)
                start = out.tell()
                out.write(f.read(g.end - g.start))  # verbatim bytes: merge == unsharded, byte for byte
                merged.append(Group(g.index, g.data_id, start, out.tell(), g.records, g.dropped))
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    write_atomic(out_dir / PROGRESS_FILE, b"".join(g.progress(legacy=False) for g in merged))
    with writing(target):
        os.replace(tmp, target)
    data = summary_bytes(summaries[0]["fingerprint"], None, True, merged)
    write_atomic(out_dir / SUMMARY_FILE, data)
    return json.loads(data)
