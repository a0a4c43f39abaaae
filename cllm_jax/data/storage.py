"""The on-disk layout of a collection directory: files, formats, scanning on reopen, the summary.

Layout (format cllm_jax.trajectories/2):
  trajectories.jsonl  the data set: one compact JSON record per line (records.py) and nothing else,
                      so pandas, `datasets` or the reference trainer read it as plain JSON lines.
  progress.jsonl      the resume bookkeeping, one line per finished prompt:
                      {"done": data_id, "index": i, "records": r, "dropped": d, "end": e}, where i is
                      the prompt's position in the unsharded prompt list, d the records dropped by
                      cleaning and e the size of trajectories.jsonl once the prompt's records are in.
  summary.json        {"format", "fingerprint", "shard", "complete", "counts"}, replaced atomically.

A prompt goes out as two appends, each one write + fsync: its records, then its progress line. A
progress line therefore only ever describes bytes already on disk. Reopening keeps the prompts of
the complete progress lines and truncates both files after the last one (a torn line, or records
whose progress line never landed); that prompt is then collected again. The collector seeds its
randomness per prompt (`prompt_rng(seed, i)`), so the redone prompt's bytes are the ones an
uninterrupted run would have written, and both files end byte-identical to it.

Format /1, written before this split, kept the progress lines inline in trajectories.jsonl after each
prompt's records (without "end"). Such a directory is still read, resumed and merged, in its format.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from cllm_jax.errors import DataError

TRAJECTORIES_FILE = "trajectories.jsonl"
PROGRESS_FILE = "progress.jsonl"
SUMMARY_FILE = "summary.json"
FORMAT = "cllm_jax.trajectories/2"
LEGACY_FORMAT = "cllm_jax.trajectories/1"  # progress lines inline in trajectories.jsonl
_NEW_OUT = "collect into a new --out directory"


def json_line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


def is_progress_line(obj: Any) -> bool:
    """A progress marker (inline in format /1 files), as opposed to a record."""
    return isinstance(obj, dict) and "done" in obj


@dataclass(frozen=True)
class Group:
    """One finished prompt: its records are bytes [start, end) of trajectories.jsonl."""

    index: int
    data_id: str | int
    start: int
    end: int
    records: int
    dropped: int

    def progress(self, legacy: bool) -> bytes:
        marker = {"done": self.data_id, "index": self.index, "records": self.records, "dropped": self.dropped}
        return json_line(marker if legacy else marker | {"end": self.end})


@dataclass(frozen=True)
class Scan:
    """What reopening a directory finds: finished prompts, and how much of each file to keep."""

    groups: list[Group]
    keep: int  # bytes of trajectories.jsonl to keep
    size: int
    progress_keep: int = 0  # the same for progress.jsonl (format /2)
    progress_size: int = 0


@contextlib.contextmanager
def writing(path: Path):
    """OSError -> one-line DataError that names the file and the fix (nothing written is lost)."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free disk space (or use another --out)"
        elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "make it writable or choose another --out"
        else:
            fix = "fix the cause"
        raise DataError(f"cannot write {path}: {e.strerror or e}; {fix}, then rerun the same command "
                        f"to resume (what is already written is kept)") from None


class _Checker:
    """Validates the sequence of progress lines: well formed, each prompt and position once."""

    def __init__(self, path: Path, legacy: bool):
        self.path, self.legacy, self.ids, self.indices = path, legacy, set(), set()

    def __call__(self, obj: dict, lineno: int) -> None:
        where = f"{self.path}:{lineno}"
        keys = ("index", "records") + (() if self.legacy else ("end",))
        if not all(isinstance(obj.get(k), int) for k in keys):
            raise DataError(f"{where}: malformed progress line {obj}; the file was damaged, {_NEW_OUT}")
        if obj["done"] in self.ids or obj["index"] in self.indices:
            raise DataError(f"{where}: prompt {obj['done']!r} (position {obj['index']}) appears twice; "
                            f"the file was damaged, {_NEW_OUT}")
        self.ids.add(obj["done"])
        self.indices.add(obj["index"])


def _scan_legacy(path: Path) -> Scan:
    """Format /1: records, then the prompt's marker line. Bytes after the last marker are a torn tail."""
    groups: list[Group] = []
    offset = keep = start = 0
    pending: list[Any] = []  # data_ids of the records since the last marker
    bad = None
    check = _Checker(path, legacy=True)
    if not path.exists():
        return Scan(groups, 0, 0)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            marker_start = offset
            offset += len(line)
            if not line.endswith(b"\n"):
                break  # half-written last line
            try:
                obj = json.loads(line)
            except ValueError:
                bad = bad or lineno
                continue
            if not is_progress_line(obj):
                pending.append(obj.get("data_id") if isinstance(obj, dict) else None)
                continue
            check(obj, lineno)
            if bad is not None:
                raise DataError(f"{path}:{bad}: corrupt line before the completed prompt at line {lineno}; "
                                f"the file was damaged, {_NEW_OUT}")
            if any(d != obj["done"] for d in pending) or len(pending) != obj["records"]:
                raise DataError(f"{path}:{lineno}: the marker for prompt {obj['done']!r} does not match the "
                                f"{len(pending)} record lines before it; {_NEW_OUT}")
            groups.append(Group(obj["index"], obj["done"], start, marker_start, obj["records"], obj.get("dropped", 0)))
            pending, keep, start = [], offset, offset
    return Scan(groups, keep, offset)


def _scan_split(out_dir: Path) -> Scan:
    """Format /2: the progress lines, each checked against the record lines it accounts for."""
    progress, path = out_dir / PROGRESS_FILE, out_dir / TRAJECTORIES_FILE
    markers, keep, size, bad = [], 0, 0, None
    check = _Checker(progress, legacy=False)
    if progress.exists():
        with open(progress, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                size += len(line)
                if not line.endswith(b"\n"):
                    break  # half-written last line
                try:
                    obj = json.loads(line)
                    assert is_progress_line(obj)
                except (ValueError, AssertionError):
                    bad = bad or lineno
                    continue
                if bad is not None:
                    raise DataError(f"{progress}:{bad}: corrupt line before line {lineno}; the file was "
                                    f"damaged, {_NEW_OUT}")
                check(obj, lineno)
                markers.append(obj)
                keep = size
    data_size = path.stat().st_size if path.exists() else 0
    last_end = markers[-1]["end"] if markers else 0
    if last_end > data_size:
        raise DataError(f"{progress} accounts for {last_end} bytes of {path}, which holds {data_size}: "
                        f"the data file was truncated or replaced; {_NEW_OUT}")
    groups: list[Group] = []
    if markers:
        with open(path, "rb") as f:
            offset = 0
            for m in markers:
                start, ids = offset, []
                while offset < m["end"]:
                    line = f.readline()
                    offset += len(line)
                    try:
                        ids.append(json.loads(line).get("data_id"))
                    except (ValueError, AttributeError):
                        ids.append(None)
                if offset != m["end"] or len(ids) != m["records"] or any(d != m["done"] for d in ids):
                    raise DataError(f"{path}: bytes {start}-{m['end']} do not hold the {m['records']} records "
                                    f"of prompt {m['done']!r} that {progress} lists; the file was damaged, {_NEW_OUT}")
                groups.append(Group(m["index"], m["done"], start, offset, m["records"], m.get("dropped", 0)))
    return Scan(groups, last_end, data_size, keep, size)


def scan_directory(out_dir: Path, summary: dict | None) -> Scan:
    legacy = summary is not None and summary.get("format") == LEGACY_FORMAT
    return _scan_legacy(out_dir / TRAJECTORIES_FILE) if legacy else _scan_split(out_dir)


def committed_end(out_dir: Path) -> int | None:
    """Bytes of a format /2 trajectories.jsonl that finished prompts account for (None: no progress file)."""
    progress = out_dir / PROGRESS_FILE
    if not progress.is_file():
        return None
    end = 0
    with open(progress, "rb") as f:
        for line in f:
            try:
                end = json.loads(line)["end"] if line.endswith(b"\n") else end
            except (ValueError, KeyError, TypeError):
                pass
    return end


def write_atomic(path: Path, data: bytes) -> None:
    with writing(path):
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def read_summary(out_dir: Path) -> dict | None:
    path = out_dir / SUMMARY_FILE
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {_NEW_OUT}") from None
    if not isinstance(summary, dict) or summary.get("format") not in (FORMAT, LEGACY_FORMAT):
        raise DataError(f"{path}: not a summary written by cllm_jax ({FORMAT}); use a new --out directory")
    return summary


def counts(groups: Sequence[Group]) -> dict:
    return {"prompts": len(groups), "records": sum(g.records for g in groups),
            "dropped_repetitive": sum(g.dropped for g in groups)}


def summary_bytes(fingerprint: dict, shard: dict | None, complete: bool, groups: Sequence[Group],
                  legacy: bool = False) -> bytes:
    summary = {"format": LEGACY_FORMAT if legacy else FORMAT, "fingerprint": fingerprint, "shard": shard,
               "complete": complete, "counts": counts(groups)}
    return (json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")

