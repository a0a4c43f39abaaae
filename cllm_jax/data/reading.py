"""Reading trajectory records: our collection directories and JSONL, and the reference's released files.

Accepted: a collection directory (its trajectories.jsonl; format /2 read up to what progress.jsonl
vouches for, format /1 with its inline progress lines skipped), any JSONL of records, and the
reference repository's JSON list (see records.py for the nested forms it uses).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from cllm_jax.data.records import TrajectoryRecord
from cllm_jax.data.storage import TRAJECTORIES_FILE, committed_end, is_progress_line
from cllm_jax.errors import DataError


def _resolve(path_or_dir: str | Path) -> tuple[Path, int | None]:
    """The file to read and, for a format /2 collection directory, how many of its bytes are finished."""
    path = Path(path_or_dir)
    end = None
    if path.is_dir():
        end = committed_end(path)
        path = path / TRAJECTORIES_FILE
    if not path.is_file():
        raise DataError(f"{path}: no trajectory file there; give a collection directory or a "
                        f".jsonl/.json trajectory file")
    return path, end


def _read_json_list(path: Path) -> Iterator[TrajectoryRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    for k, item in enumerate(items):
        try:
            yield TrajectoryRecord.from_json(item)
        except DataError as e:
            raise DataError(f"{path}: record {k}: {e}") from None


def read_trajectories(path_or_dir: str | Path) -> Iterator[TrajectoryRecord]:
    """Records from a collection directory, our JSONL, or a reference JSON list (or JSONL)."""
    path, end = _resolve(path_or_dir)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        yield from _read_json_list(path)
        return
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if end is not None and offset >= end:
                return  # an unfinished prompt (a killed run): the collector redoes it on resume
            offset += len(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if is_progress_line(obj):
                    continue  # format /1: an inline progress line
                yield TrajectoryRecord.from_json(obj)
            except (json.JSONDecodeError, DataError) as e:
                msg = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(f"{path}:{lineno}: {msg}; if a collection was killed, reopening its "
                                f"directory with the collector repairs a half-written tail") from None
