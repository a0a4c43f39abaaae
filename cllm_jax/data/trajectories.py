"""Jacobi trajectory records: schema, augmentation, cleaning, a resumable writer, shards.

Record (one per block, the reference schema; see cllm-reference.md):
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

On-disk format of a collection directory (written by TrajectoryWriter):
  trajectories.jsonl  one compact JSON record per line; after the records of a prompt, a marker
                      line {"done": data_id, "index": i, "records": r, "dropped": d} where i is the
                      prompt's position in the unsharded prompt list and d the records dropped by
                      cleaning. A prompt's records and its marker go out in a single write + fsync.
  summary.json        {"format", "fingerprint", "shard", "complete", "counts"}, replaced atomically.
Resume keeps everything up to the last marker and truncates the rest (a half-written line, or the
records of a prompt whose marker never landed); that prompt is then collected again. Because the
collector seeds its randomness per prompt (`prompt_rng(seed, i)`), the redone prompt's bytes are
the ones an uninterrupted run would have written.

Order, and why merge == unsharded: an unsharded run writes prompts in increasing position i; shard
s of c holds positions i with i % c == s, also in increasing order. `merge_shards` sorts the
prompt groups of all shards by i and copies their bytes verbatim, which reproduces the unsharded
file byte for byte (and the same summary.json).
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from cllm_jax.errors import ConfigError, DataError

TRAJECTORIES_FILE = "trajectories.jsonl"
SUMMARY_FILE = "summary.json"
FORMAT = "cllm_jax.trajectories/1"


# ---------------------------------------------------------------------------------------- record

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


@dataclass(frozen=True)
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


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"


# ------------------------------------------------------------------------ augmentation, cleaning

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


def prompt_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of prompt `index`: independent of sharding and of where a run resumed."""
    return np.random.default_rng([seed, index])


# ---------------------------------------------------------------------------------------- reading

def _resolve(path_or_dir: str | Path) -> Path:
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / TRAJECTORIES_FILE
    if not path.is_file():
        raise DataError(f"{path}: no trajectory file there; give a collection directory or a "
                        f".jsonl/.json trajectory file")
    return path


def read_trajectories(path_or_dir: str | Path) -> Iterator[TrajectoryRecord]:
    """Records from a collection directory, our JSONL, or a reference JSON list (or JSONL)."""
    path = _resolve(path_or_dir)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
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
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if isinstance(obj, dict) and "done" in obj:
                    continue  # end-of-prompt marker
                yield TrajectoryRecord.from_json(obj)
            except (json.JSONDecodeError, DataError) as e:
                msg = f"not valid JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else str(e)
                raise DataError(f"{path}:{lineno}: {msg}; if a collection was killed, reopening its "
                                f"directory with the collector repairs a half-written tail") from None


# ---------------------------------------------------------------------------------------- writer

@dataclass(frozen=True)
class _Group:
    """One prompt's lines in a trajectories.jsonl: bytes [start, end) including its marker."""
    index: int
    data_id: str | int
    start: int
    end: int
    records: int
    dropped: int


def _scan(path: Path) -> tuple[list[_Group], int, int]:
    """(complete prompt groups, end offset of the last one, file size).

    Bytes after the last marker are a torn tail (kill -9 mid-write) and are reported, not parsed
    strictly; a bad line followed by a later marker is real corruption and raises.
    """
    groups: list[_Group] = []
    offset = good_end = start = 0
    pending: list[Any] = []  # data_ids of the records since the last marker
    bad = None
    seen: set = set()
    seen_index: set = set()
    if not path.exists():
        return groups, 0, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            offset += len(line)
            if not line.endswith(b"\n"):
                break  # half-written last line
            try:
                obj = json.loads(line)
            except ValueError:
                bad = bad or lineno
                continue
            if not (isinstance(obj, dict) and "done" in obj):
                pending.append(obj.get("data_id") if isinstance(obj, dict) else None)
                continue
            where = f"{path}:{lineno}"
            if not (isinstance(obj.get("index"), int) and isinstance(obj.get("records"), int)):
                raise DataError(f"{where}: malformed end-of-prompt marker {obj}; the file was damaged, "
                                f"collect into a new --out directory")
            if obj["done"] in seen or obj["index"] in seen_index:
                raise DataError(f"{where}: prompt {obj['done']!r} (position {obj['index']}) appears "
                                f"twice; the file was damaged, collect into a new --out directory")
            seen.add(obj["done"])
            seen_index.add(obj["index"])
            if bad is not None:
                raise DataError(f"{path}:{bad}: corrupt line before the completed prompt at line "
                                f"{lineno}; the file was damaged, collect into a new --out directory")
            if any(d != obj["done"] for d in pending) or len(pending) != obj.get("records"):
                raise DataError(f"{where}: the marker for prompt {obj['done']!r} does not match the "
                                f"{len(pending)} record lines before it; collect into a new --out directory")
            groups.append(_Group(obj["index"], obj["done"], start, offset, obj["records"],
                                 obj.get("dropped", 0)))
            pending, good_end, start = [], offset, offset
    return groups, good_end, offset


def _write_atomic(path: Path, data: bytes) -> None:
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
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); collect into a new --out directory")
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        raise DataError(f"{path}: not a summary written by cllm_jax ({FORMAT}); use a new --out directory")
    return summary


def _summary_bytes(fingerprint: dict, shard: dict | None, complete: bool, counts: dict) -> bytes:
    summary = {"format": FORMAT, "fingerprint": fingerprint, "shard": shard,
               "complete": complete, "counts": counts}
    return (json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _counts(groups: Sequence[_Group]) -> dict:
    return {"prompts": len(groups), "records": sum(g.records for g in groups),
            "dropped_repetitive": sum(g.dropped for g in groups)}


def _diff(stored: dict, new: dict) -> str:
    keys = sorted(set(stored) | set(new), key=str)
    return "; ".join(f"{k}: {stored.get(k, '<absent>')!r} there, {new.get(k, '<absent>')!r} now"[:160]
                     for k in keys if stored.get(k, "<absent>") != new.get(k, "<absent>"))


class TrajectoryWriter:
    """Append-only, crash-safe writer of one collection directory (see the module docstring).

    `fingerprint` names the model and every option that changes the records (weights hash, block
    size, max new tokens, augmentation, seed, dataset, limit...). Reopening a directory whose
    summary holds a different fingerprint or shard raises DataError; with the same ones, it resumes:
    skip the prompts in `done_ids`, write the others.
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
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.out_dir / ".lock", "w")
        try:  # two collectors appending to one file would interleave their prompts
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise DataError(f"another collection is writing to {self.out_dir}; give each run "
                            f"(and each shard) its own --out directory") from None
        try:
            self._open()
        except BaseException:
            self._lock.close()
            raise

    def _open(self) -> None:
        self.path = self.out_dir / TRAJECTORIES_FILE
        summary = read_summary(self.out_dir)
        if summary is None:
            if self.path.exists() and self.path.stat().st_size:
                raise DataError(f"{self.path} exists without {SUMMARY_FILE}: not a cllm_jax collection "
                                f"directory; use a new --out directory")
            self._complete = False
        else:
            if summary.get("fingerprint") != self.fingerprint:
                raise DataError(f"{self.out_dir} holds trajectories of a different model or different "
                                f"options ({_diff(summary.get('fingerprint') or {}, self.fingerprint)}); "
                                f"use a new --out directory, or delete this one to start over")
            if summary.get("shard") != self.shard:
                raise DataError(f"{self.out_dir} was written as shard {summary.get('shard')}, not "
                                f"{self.shard}; use the matching --shard or a new --out directory")
            self._complete = bool(summary.get("complete"))
        groups, good_end, size = _scan(self.path)
        self.repaired_bytes = size - good_end  # > 0: a torn write was cut off (that prompt is redone)
        if self.repaired_bytes:
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        self._groups = groups
        self._done = {g.data_id for g in groups}
        self._done_indices = {g.index for g in groups}
        if summary is None:
            self._write_summary()  # the fingerprint lands before any record does
        self._file = open(self.path, "ab")

    @property
    def done_ids(self) -> frozenset:
        return frozenset(self._done)

    @property
    def counts(self) -> dict:
        return _counts(self._groups)

    def write_prompt(self, index: int, data_id: str | int, records: Sequence[TrajectoryRecord],
                     dropped: int = 0) -> None:
        """All records of prompt `index` (its position in the unsharded list) and its marker, durably.

        Records are written in block order; `dropped` counts the records removed by cleaning.
        """
        if self._file.closed:
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
        marker = {"done": data_id, "index": index, "records": len(records), "dropped": dropped}
        payload = b"".join(_dumps(r.to_json()) for r in records) + _dumps(marker)
        start = self._file.tell()
        self._file.write(payload)  # one write: a kill leaves a torn tail that reopening removes
        self._file.flush()
        os.fsync(self._file.fileno())
        self._groups.append(_Group(index, data_id, start, start + len(payload), len(records), dropped))
        self._done.add(data_id)
        self._done_indices.add(index)
        self._complete = False

    def _write_summary(self) -> None:
        _write_atomic(self.out_dir / SUMMARY_FILE,
                      _summary_bytes(self.fingerprint, self.shard, self._complete, self.counts))

    def close(self, complete: bool = False) -> None:
        """Write summary.json; `complete=True` once every prompt of this run (or shard) is in."""
        if complete:
            self._complete = True
        self._write_summary()
        self._file.close()
        self._lock.close()  # releases the flock

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._file.closed:
            self.close()


# ---------------------------------------------------------------------------------------- shards

def shard_examples(examples: Sequence, index: int, count: int) -> list[tuple[int, Any]]:
    """(position, example) pairs of shard `index` of `count`: position i goes to shard i % count.

    The position is what `TrajectoryWriter.write_prompt` takes as `index`; an unsharded run is
    shard 0 of 1.
    """
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard {index} of {count}: need count >= 1 and 0 <= index < count")
    return [(i, ex) for i, ex in enumerate(examples) if i % count == index]


def merge_shards(shard_dirs: Sequence[str | Path], out_dir: str | Path) -> dict:
    """Merge complete shard directories into `out_dir`, identical to an unsharded run's output.

    Returns the merged summary. Every shard must come from the same fingerprint, all `count`
    shards must be present once, each complete, and together cover positions 0..N-1.
    """
    dirs = [Path(d) for d in shard_dirs]
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
                            f"({_diff(fingerprint, s['fingerprint'])}); only shards of one run merge")
        if not s.get("shard"):
            raise DataError(f"{d} is not a shard (it was collected unsharded)")
        if not s.get("complete"):
            raise DataError(f"{d} is incomplete; resume that shard with the same command first")
    count = summaries[0]["shard"]["count"]
    found = sorted(s["shard"]["index"] for s in summaries)
    if any(s["shard"]["count"] != count for s in summaries) or found != list(range(count)):
        raise DataError(f"shards {found} given, need each of 0..{count - 1} exactly once")

    pieces: list[tuple[int, Path, _Group]] = []
    for d in dirs:
        path = d / TRAJECTORIES_FILE
        groups, good_end, size = _scan(path)
        if good_end != size:
            raise DataError(f"{path} ends in a half-written prompt; resume that shard first")
        pieces += [(g.index, path, g) for g in groups]
    pieces.sort(key=lambda p: p[0])
    positions = [p[0] for p in pieces]
    if positions != list(range(len(positions))):
        missing = sorted(set(range(max(positions, default=-1) + 1)) - set(positions))[:10]
        raise DataError(f"merged shards do not cover prompt positions 0..N-1 exactly once (missing "
                        f"{missing}, or repeated); were the shards collected from one prompt list?")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / TRAJECTORIES_FILE
    if target.exists() or (out_dir / SUMMARY_FILE).exists():
        raise DataError(f"{out_dir} already holds a collection; merge into a new directory")
    tmp = target.with_name(target.name + ".tmp")
    handles: dict[Path, Any] = {}
    try:
        with open(tmp, "wb") as out:
            for _, path, g in pieces:
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                f.seek(g.start)
                out.write(f.read(g.end - g.start))  # verbatim bytes: merge == unsharded, byte for byte
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in handles.values():
            f.close()
    os.replace(tmp, target)
    summary_bytes = _summary_bytes(fingerprint, None, True, _counts([p[2] for p in pieces]))
    _write_atomic(out_dir / SUMMARY_FILE, summary_bytes)
    return json.loads(summary_bytes)
