"""TrajectoryWriter: the append-only, crash-safe, resumable writer of a collection directory (storage.py)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Sequence

from cllm_jax.data.records import TrajectoryRecord
from cllm_jax.data.storage import (LEGACY_FORMAT, PROGRESS_FILE, SUMMARY_FILE, TRAJECTORIES_FILE, Group, counts,
                                   json_line, read_summary, scan_directory, summary_bytes,
                                   write_atomic, writing)
from cllm_jax.errors import ConfigError, DataError, describe_differences


def _lock(out_dir: Path) -> int | None:
    """An exclusive flock on out_dir/.lock: two collectors appending to one file would interleave."""
    path = out_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if not path.exists():
            return None  # a read-only directory: nobody writes here, and writing would fail in one line
        fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(f"another collection is writing to {out_dir}; give each run (and each shard) "
                        f"its own --out directory") from None
    return fd


def _truncate(path: Path, size: int) -> None:
    with writing(path), open(path, "r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())


def _append(f, payload: bytes) -> None:
    f.write(payload)  # one write: a kill leaves at most a torn tail, which reopening removes
    f.flush()
    os.fsync(f.fileno())


class TrajectoryWriter:
    """Append-only, crash-safe writer of one collection directory (see the module docstring).

    `fingerprint` names the model and every option that changes the records (weights hash, block
    size, max new tokens, augmentation, seed, dataset, limit...). Reopening a directory whose
    summary holds a different fingerprint or shard raises DataError; with the same ones, it resumes:
    skip the prompts in `done_ids`, write the others. The data files are opened for appending only
    when a prompt is written, so reopening a finished collection writes nothing at all.
    """

    def __init__(self, out_dir: str | Path, fingerprint: dict, shard: tuple[int, int] | None = None):
        self.out_dir = Path(out_dir)
        try:  # canonical JSON form, so that tuples vs lists or key order never count as a change
            self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the collection fingerprint must be JSON-serialisable: {e}") from None
        self.shard = None
        if shard is not None:
            index, count = shard
            if not 0 <= index < count:
                raise ConfigError(f"shard index must be in [0, {count}), got {index}")
            self.shard = {"index": index, "count": count}
        with writing(self.out_dir):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._lock = _lock(self.out_dir)
        self._files, self._closed = None, False
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _open(self) -> None:
        self.path = self.out_dir / TRAJECTORIES_FILE
        self.progress_path = self.out_dir / PROGRESS_FILE
        summary = read_summary(self.out_dir)
        if summary is None:
            for path in (self.path, self.progress_path):
                if path.exists() and path.stat().st_size:
                    raise DataError(f"{path} exists without {SUMMARY_FILE}: not a cllm_jax collection "
                                    f"directory; use a new --out directory")
            self._complete = False
        else:
            if summary.get("fingerprint") != self.fingerprint:
                raise DataError(f"{self.out_dir} holds trajectories of a different model or different options "
                                f"({describe_differences(summary.get('fingerprint') or {}, self.fingerprint)}); "
                                f"use a new --out directory, or delete this one to start over")
            if summary.get("shard") != self.shard:
                raise DataError(f"{self.out_dir} was written as shard {summary.get('shard')}, not "
                                f"{self.shard}; use the matching --shard or a new --out directory")
            self._complete = bool(summary.get("complete"))
        self.legacy = summary is not None and summary.get("format") == LEGACY_FORMAT
        scan = scan_directory(self.out_dir, summary)
        # > 0: a torn write was cut off (that prompt is collected again)
        self.repaired_bytes = scan.size - scan.keep + scan.progress_size - scan.progress_keep
        if scan.size > scan.keep:
            _truncate(self.path, scan.keep)
        if scan.progress_size > scan.progress_keep:
            _truncate(self.progress_path, scan.progress_keep)
        self._groups = list(scan.groups)
        self._size = scan.keep
        self._done = {g.data_id for g in self._groups}
        self._done_indices = {g.index for g in self._groups}
        if summary is None:
            self._write_summary()  # the fingerprint lands before any record does

    @property
    def done_ids(self) -> frozenset:
        return frozenset(self._done)

    @property
    def counts(self) -> dict:
        return counts(self._groups)

    def write_prompt(self, index: int, data_id: str | int, records: Sequence[TrajectoryRecord],
                     dropped: int = 0) -> None:
        """All records of prompt `index` (its position in the unsharded list) and its progress line, durably.

        Records are written in block order; `dropped` counts the records removed by cleaning.
        """
        if self._closed:
            raise ValueError("write_prompt on a closed TrajectoryWriter")
        if data_id in self._done or index in self._done_indices:
            raise DataError(f"prompt {data_id!r} (position {index}) is already in {self.path}; "
                            f"skip the prompts in done_ids when resuming")
        if self.shard and index % self.shard["count"] != self.shard["index"]:
            raise ConfigError(f"position {index} does not belong to shard {self.shard}")
        records = sorted(records, key=lambda r: r.jacobian_itr_id)
        for r in records:
            if r.data_id != data_id:
                raise DataError(f"record of {r.data_id!r} passed with prompt {data_id!r}")
        if len({r.jacobian_itr_id for r in records}) != len(records):
            raise DataError(f"prompt {data_id!r} has two records for the same block")
        if self._files is None:
            if self._complete:  # new prompts make a finished directory unfinished until close
                self._complete = False
                self._write_summary()
            with writing(self.out_dir):
                self._files = (open(self.path, "ab"), None if self.legacy else open(self.progress_path, "ab"))
        payload = b"".join(json_line(r.to_json()) for r in records)
        group = Group(index, data_id, self._size, self._size + len(payload), len(records), dropped)
        data, progress = self._files
        if self.legacy:
            with writing(self.path):
                _append(data, payload + group.progress(legacy=True))
            self._size = group.end + len(group.progress(legacy=True))
        else:
            with writing(self.path):
                _append(data, payload)  # the records are durable before the line that vouches for them
            with writing(self.progress_path):
                _append(progress, group.progress(legacy=False))
            self._size = group.end
        self._groups.append(group)
        self._done.add(data_id)
        self._done_indices.add(index)

    def _write_summary(self) -> None:
        data = summary_bytes(self.fingerprint, self.shard, self._complete, self._groups, self.legacy)
        path = self.out_dir / SUMMARY_FILE
        if not (path.exists() and path.read_bytes() == data):  # unchanged: write nothing (read-only dirs)
            write_atomic(path, data)

    def _release(self) -> None:
        for f in self._files or ():
            if f is not None:
                f.close()
        if self._lock is not None:
            os.close(self._lock)  # releases the flock
        self._lock, self._closed = None, True

    def close(self, complete: bool = False) -> None:
        """Write summary.json; `complete=True` once every prompt of this run (or shard) is in."""
        try:
            if complete:
                self._complete = True
            self._write_summary()
        finally:
            self._release()

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.close()
        else:
            self._release()  # a failed write (full disk): the next run repairs, no second error on top
