import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cllm_jax.data.trajectories import (LEGACY_FORMAT, PROGRESS_FILE, SUMMARY_FILE, TRAJECTORIES_FILE,
                                        TrajectoryRecord, TrajectoryWriter, augment_trajectory, drop_repetitive,
                                        has_repetition, merge_shards, prompt_rng, read_trajectories,
                                        shard_examples)
from cllm_jax.errors import ConfigError, DataError

FIXTURE = Path(__file__).parent / "data" / "reference_trajectories.json"
EOS = 2
FP = {"model": "tiny", "weights_sha256": "abc", "block_size": 4, "max_new_tokens": 12, "aug": True, "seed": 0}


# ------------------------------------------------------------------ a stand-in collector

def fake_prompt_records(index, data_id, seed=0, n=4, blocks=3):
    """Deterministic records of one prompt, drawn from prompt_rng like the real collector."""
    rng = prompt_rng(seed, index)
    prompt = [1] + rng.integers(3, 50, size=3).tolist()
    fixed_points = [rng.integers(3, 50, size=n).tolist() for _ in range(blocks)]
    complete = prompt + sum(fixed_points, [])
    records, prefix = [], list(prompt)
    for k, fixed in enumerate(fixed_points):
        states = [rng.integers(3, 50, size=n).tolist() for _ in range(3)] + [fixed]
        states[0][0] = fixed[0]
        records.append(TrajectoryRecord(
            data_id=data_id,
            jacobian_itr_id=k,
            prompt_ids_len=len(prompt),
            prompt_ids=prefix,
            answer_trajectory_ids=augment_trajectory(states, rng),
            teacher_output_ids=prefix + fixed,
            complete_teacher_output_ids=complete,
        ))
        prefix = prefix + fixed
    return records


def collect(out_dir, examples, shard=None, stop_after=None):
    """Run (or resume) a collection; returns the writer's done_ids at open."""
    with TrajectoryWriter(out_dir, FP, shard=shard) as w:
        done = w.done_ids
        todo = shard_examples(examples, *(shard or (0, 1)))
        for n, (i, data_id) in enumerate(x for x in todo if x[1] not in done):
            if stop_after is not None and n == stop_after:
                return done
            w.write_prompt(i, data_id, fake_prompt_records(i, data_id))
        w.close(complete=True)
    return done


EXAMPLES = [f"p{i}" for i in range(7)]


# ------------------------------------------------------------------ record schema

def test_record_round_trip_and_numpy_inputs():
    r = TrajectoryRecord(
        data_id=np.int64(3),
        jacobian_itr_id=1,
        prompt_ids_len=2,
        prompt_ids=np.array([[1, 5, 6, 7]]),
        answer_trajectory_ids=np.array([[9, 9], [8, 9]]),
        teacher_output_ids=[1, 5, 6, 7, 8, 9],
        complete_teacher_output_ids=[1, 5, 6, 7, 8, 9, 4, 2],
        labels_ids=None,
    )
    assert r.data_id == 3 and r.prompt_ids == (1, 5, 6, 7) and r.fixed_point == (8, 9) and r.block_size == 2
    d = r.to_json()
    assert "labels_ids" not in d and d["answer_trajectory_ids"] == [[9, 9], [8, 9]]
    assert TrajectoryRecord.from_json(json.loads(json.dumps(d))) == r


@pytest.mark.parametrize("change,words", [
    ({"answer_trajectory_ids": [[1, 2], [3]]}, "same"),
    ({"prompt_ids": [[1, 2], [3, 4]]}, "batch"),
    ({"prompt_ids_len": 9}, "inconsistent"),
    ({"teacher_output_ids": [1, "x"]}, "integer"),
])
def test_record_validation(change, words):
    d = {"data_id": 0, "jacobian_itr_id": 0, "prompt_ids_len": 2, "prompt_ids": [1, 2],
         "answer_trajectory_ids": [[3, 4]], "teacher_output_ids": [1, 2, 3, 4],
         "complete_teacher_output_ids": [1, 2, 3, 4]}
    with pytest.raises(DataError, match=words):
        TrajectoryRecord.from_json({**d, **change})
    with pytest.raises(DataError, match="lacks teacher_output_ids"):
        TrajectoryRecord.from_json({k: v for k, v in d.items() if k != "teacher_output_ids"})


def test_reference_fixture_loads_and_normalises():
    recs = list(read_trajectories(FIXTURE))
    assert [(r.data_id, r.jacobian_itr_id) for r in recs] == [("data_0", 0), ("data_0", 1),
                                                               ("data_1", 0), ("data_1", 1)]
    r0, r1, r2, r3 = recs
    assert r0.prompt_ids == (1, 5, 6, 7) and r0.prompt_ids_len == 4  # [[[...]]] and [4] peeled
    assert r0.teacher_output_ids == r0.prompt_ids + r0.fixed_point
    assert r1.prompt_ids == r0.teacher_output_ids and r1.complete_teacher_output_ids == r1.teacher_output_ids
    assert r0.labels_ids == (1, 5, 6, 7, 8, 9, 10, 11, 12, 2) and r2.labels_ids == (1, 20, 21)
    assert r3.prompt_ids_len == 3  # the GSM8K script's grown prefix length, mapped back
    assert all(r.block_size == 4 for r in recs)


def test_reference_records_as_jsonl(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in json.loads(FIXTURE.read_text())))
    assert list(read_trajectories(path)) == list(read_trajectories(FIXTURE))


def test_read_errors_name_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    good = json.dumps(json.loads(FIXTURE.read_text())[0])
    path.write_text(good + "\n" + good[:40] + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        list(read_trajectories(path))
    path.write_text(good + "\n" + '{"data_id": 1}\n')
    with pytest.raises(DataError, match=rf"{path}:2: record lacks"):
        list(read_trajectories(path))
    with pytest.raises(DataError, match="no trajectory file"):
        list(read_trajectories(tmp_path / "nothing"))


# ------------------------------------------------------------------ augmentation

def test_augment_by_hand():
    fixed = [10, 11, 12, 13, 14, 15]
    states = [
        [10, 0, 0, 0, 0, 0],     # 5 wrong: gets an augmented copy
        [10, 11, 0, 13, 0, 15],  # 2 wrong: exactly the second one is fixed
        [10, 11, 12, 13, 0, 15],  # 1 wrong: nothing to fix without touching the first wrong one
        [10, 11, 12, 13, 14, 0],  # second to last: never augmented
        fixed,
    ]
    out = augment_trajectory(states, np.random.default_rng(0))
    assert out[2:] == states and len(out) == 7
    assert out[1] == [10, 11, 0, 13, 14, 15]
    first = out[0]
    assert first[:2] == [10, 0]  # position 1, the first wrong token, stays wrong
    fixed_now = [p for p in range(2, 6) if first[p] == fixed[p]]
    assert 1 <= len(fixed_now) <= 4 and all(first[p] == 0 for p in range(2, 6) if p not in fixed_now)


def test_augment_rule_holds_on_random_trajectories():
    rng = np.random.default_rng(1)
    sizes = []
    for trial in range(200):
        n = int(rng.integers(2, 12))
        fixed = rng.integers(0, 5, size=n).tolist()
        states = [rng.integers(0, 5, size=n).tolist() for _ in range(int(rng.integers(1, 6)))] + [fixed]
        out = augment_trajectory(states, np.random.default_rng(trial))
        assert out == augment_trajectory(states, np.random.default_rng(trial))  # seeded = reproducible
        assert out[len(out) - len(states):] == states
        aug = out[:len(out) - len(states)]
        eligible = [s for s in states[:-2] if sum(a != b for a, b in zip(s, fixed)) >= 2]
        assert len(aug) == len(eligible)
        for src, new in zip(eligible, aug):
            wrong = [p for p in range(n) if src[p] != fixed[p]]
            changed = [p for p in range(n) if new[p] != src[p]]
            assert wrong[0] not in changed and set(changed) <= set(wrong)
            assert all(new[p] == fixed[p] for p in changed)
            assert 1 <= len(changed) <= len(wrong) - 1
            sizes.append(len(changed) / (len(wrong) - 1))
    assert 0.4 < np.mean(sizes) < 0.8  # "about half" of the correctable tokens on average


# ------------------------------------------------------------------ cleaning

def test_has_repetition():
    assert has_repetition([5] * 10, EOS)
    assert not has_repetition([5] * 9 + [6] + [5] * 9, EOS)
    assert has_repetition([1, 3] + [7] * 10 + [EOS], EOS)
    assert not has_repetition([1, EOS] + [7] * 20, EOS)  # after EOS it does not count
    assert not has_repetition([EOS] * 12, EOS)
    assert has_repetition([EOS] * 12, None)
    assert has_repetition([3, 3, 3], EOS, run=3) and not has_repetition([3, 3], EOS, run=3)


def test_drop_repetitive_looks_at_the_output_only():
    prompt = [1] + [0] * 10  # a prompt like "10000000000" must not count
    ok = TrajectoryRecord(
        data_id=0,
        jacobian_itr_id=0,
        prompt_ids_len=len(prompt),
        prompt_ids=prompt,
        answer_trajectory_ids=[[4, 5]],
        teacher_output_ids=prompt + [4, 5],
        complete_teacher_output_ids=prompt + [4, 5],
    )
    bad_out = [9] * 10
    bad = TrajectoryRecord(
        data_id=0,
        jacobian_itr_id=1,
        prompt_ids_len=len(prompt),
        prompt_ids=prompt + [4, 5],
        answer_trajectory_ids=[bad_out],
        teacher_output_ids=prompt + [4, 5] + bad_out,
        complete_teacher_output_ids=prompt + [4, 5] + bad_out,
    )
    assert drop_repetitive([ok, bad], EOS) == ([ok], 1)


# ------------------------------------------------------------------ writer, resume

# The reference schema, written out independently of the code: what a plain JSON-lines reader must find.
REFERENCE_KEYS = {"data_id", "jacobian_itr_id", "prompt_ids_len", "prompt_ids", "answer_trajectory_ids",
                  "teacher_output_ids", "complete_teacher_output_ids"}


def test_uninterrupted_run_layout(tmp_path):
    collect(tmp_path / "a", EXAMPLES)
    lines = (tmp_path / "a" / TRAJECTORIES_FILE).read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # a plain JSON-lines reader, as pandas or datasets would
    assert len(rows) == 7 * 3 and all(set(row) == REFERENCE_KEYS for row in rows)
    assert [(r["data_id"], r["jacobian_itr_id"]) for r in rows[:4]] == [("p0", 0), ("p0", 1), ("p0", 2), ("p1", 0)]
    progress = [json.loads(line) for line in (tmp_path / "a" / PROGRESS_FILE).read_text().splitlines()]
    first_prompt = sum(len(line) + 1 for line in lines[:3])
    assert progress[0] == {"done": "p0", "index": 0, "records": 3, "dropped": 0, "end": first_prompt}
    assert [p["done"] for p in progress] == EXAMPLES
    summary = json.loads((tmp_path / "a" / SUMMARY_FILE).read_text())
    assert summary["complete"] and summary["fingerprint"] == FP and summary["shard"] is None
    assert summary["counts"] == {"prompts": 7, "records": 21, "dropped_repetitive": 0}
    recs = list(read_trajectories(tmp_path / "a"))
    assert [(r.data_id, r.jacobian_itr_id) for r in recs[:4]] == [("p0", 0), ("p0", 1), ("p0", 2), ("p1", 0)]
    assert recs[0] == fake_prompt_records(0, "p0")[0]


def record_bytes(index, data_id):
    return b"".join(json.dumps(r.to_json(), separators=(",", ":")).encode() + b"\n"
                    for r in fake_prompt_records(index, data_id))


@pytest.mark.parametrize("torn", ["half_line", "records_without_progress", "progress_without_newline"])
def test_kill_and_resume_gives_identical_files(tmp_path, torn):
    collect(tmp_path / "ref", EXAMPLES)
    expected = {name: (tmp_path / "ref" / name).read_bytes() for name in (TRAJECTORIES_FILE, PROGRESS_FILE)}

    run = tmp_path / "run"
    collect(run, EXAMPLES, stop_after=3)  # killed after three prompts ...
    path, progress = run / TRAJECTORIES_FILE, run / PROGRESS_FILE
    group = record_bytes(3, "p3")
    end = path.stat().st_size + len(group)
    data_tail, progress_tail = {  # ... in the middle of the fourth prompt's writes
        "half_line": (group[: len(group) // 2], b""),
        "records_without_progress": (group, b""),
        "progress_without_newline": (group, b'{"done":"p3","index":3,"records":3,"dropped":0,"end":%d}' % end),
    }[torn]
    with open(path, "ab") as f:
        f.write(data_tail)
    with open(progress, "ab") as f:
        f.write(progress_tail)

    w = TrajectoryWriter(run, FP)
    assert w.done_ids == {"p0", "p1", "p2"} and w.repaired_bytes == len(data_tail) + len(progress_tail)
    for name, data in expected.items():
        assert (run / name).read_bytes() == data[: (run / name).stat().st_size]
    w.close()
    assert collect(run, EXAMPLES) == {"p0", "p1", "p2"}
    for name, data in expected.items():
        assert (run / name).read_bytes() == data
    assert (run / SUMMARY_FILE).read_bytes() == (tmp_path / "ref" / SUMMARY_FILE).read_bytes()
    assert collect(run, EXAMPLES) == set(EXAMPLES)  # a finished run resumes to a no-op
    assert path.read_bytes() == expected[TRAJECTORIES_FILE]


def test_reader_stops_at_the_last_finished_prompt(tmp_path):
    collect(tmp_path, EXAMPLES, stop_after=2)
    with open(tmp_path / TRAJECTORIES_FILE, "ab") as f:
        f.write(record_bytes(2, "p2")[:50])  # a killed run's torn tail
    assert [r.data_id for r in read_trajectories(tmp_path)] == ["p0"] * 3 + ["p1"] * 3


KILL_SCRIPT = """
import sys
from tests.test_trajectories import collect
collect(sys.argv[1], [f"q{i}" for i in range(400)])
"""


def test_real_kill_9_then_resume(tmp_path):
    examples = [f"q{i}" for i in range(400)]
    collect(tmp_path / "ref", examples)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run)], cwd=Path(__file__).parents[1])
    path = run / TRAJECTORIES_FILE
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and not (path.exists() and path.stat().st_size > 2000):
        time.sleep(0.002)
    proc.kill()  # SIGKILL, wherever it is
    proc.wait()
    collect(run, examples)
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE):
        assert (run / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


def test_one_writer_per_directory(tmp_path):
    with TrajectoryWriter(tmp_path, FP):
        with pytest.raises(DataError, match="another collection is writing"):
            TrajectoryWriter(tmp_path, FP)
    TrajectoryWriter(tmp_path, FP).close()


def test_reopen_with_other_model_or_options_is_refused(tmp_path):
    collect(tmp_path, EXAMPLES[:2])
    with pytest.raises(DataError, match=r"different model or .*block_size: 4 there, 8 now.*new --out"):
        TrajectoryWriter(tmp_path, {**FP, "block_size": 8})
    with pytest.raises(DataError, match="shard"):
        TrajectoryWriter(tmp_path, FP, shard=(0, 2))
    TrajectoryWriter(tmp_path, dict(reversed(FP.items()))).close()  # key order is no difference


def test_writer_refuses_duplicates_and_foreign_files(tmp_path):
    with TrajectoryWriter(tmp_path / "a", FP) as w:
        w.write_prompt(0, "p0", fake_prompt_records(0, "p0"))
        with pytest.raises(DataError, match="already"):
            w.write_prompt(0, "p0", fake_prompt_records(0, "p0"))
        with pytest.raises(DataError, match="passed with prompt"):
            w.write_prompt(1, "p1", fake_prompt_records(1, "p0"))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / TRAJECTORIES_FILE).write_text('{"x": 1}\n')
    with pytest.raises(DataError, match="without summary.json"):
        TrajectoryWriter(tmp_path / "b", FP)


def test_corruption_inside_completed_prompts_is_an_error(tmp_path):
    collect(tmp_path, EXAMPLES[:3])
    path = tmp_path / TRAJECTORIES_FILE
    lines = path.read_bytes().split(b"\n")
    lines[1] = lines[1][:20] + b"#" * (len(lines[1]) - 20)  # damaged in place, same length
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=rf"{path}: bytes 0-\d+ do not hold the 3 records of prompt 'p0'"):
        TrajectoryWriter(tmp_path, FP)
    progress = tmp_path / PROGRESS_FILE
    lines = progress.read_bytes().split(b"\n")
    progress.write_bytes(b"\n".join([lines[0][:10]] + lines[1:]))
    with pytest.raises(DataError, match=rf"{progress}:1: corrupt line"):
        TrajectoryWriter(tmp_path, FP)


def test_truncated_data_file_is_an_error_not_a_silent_redo(tmp_path):
    collect(tmp_path, EXAMPLES[:3])
    path = tmp_path / TRAJECTORIES_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or replaced"):
        TrajectoryWriter(tmp_path, FP)


# ------------------------------------------------------------------ format /1 (progress lines inline)

def legacy_collection(out_dir, examples, stop_after=None, torn=b""):
    """A directory as the collector wrote it before the split: markers inline, summary format /1."""
    out_dir.mkdir(parents=True)
    data = b""
    for n, (i, data_id) in enumerate(shard_examples(examples, 0, 1)):
        if n == stop_after:
            break
        data += record_bytes(i, data_id) + json.dumps(
            {"done": data_id, "index": i, "records": 3, "dropped": 0}, separators=(",", ":")).encode() + b"\n"
    (out_dir / TRAJECTORIES_FILE).write_bytes(data + torn)
    done = len(examples) if stop_after is None else stop_after
    summary = {"format": LEGACY_FORMAT, "fingerprint": FP, "shard": None, "complete": stop_after is None,
               "counts": {"prompts": done, "records": 3 * done, "dropped_repetitive": 0}}
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return data


def test_legacy_directory_is_read_and_resumed_in_its_format(tmp_path):
    whole = legacy_collection(tmp_path / "whole", EXAMPLES)
    assert list(read_trajectories(tmp_path / "whole")) == [r for i, p in enumerate(EXAMPLES)
                                                           for r in fake_prompt_records(i, p)]
    legacy_collection(tmp_path / "run", EXAMPLES, stop_after=3, torn=record_bytes(3, "p3")[:70])
    assert collect(tmp_path / "run", EXAMPLES) == {"p0", "p1", "p2"}
    assert (tmp_path / "run" / TRAJECTORIES_FILE).read_bytes() == whole
    assert not (tmp_path / "run" / PROGRESS_FILE).exists()
    assert (tmp_path / "run" / SUMMARY_FILE).read_bytes() == (tmp_path / "whole" / SUMMARY_FILE).read_bytes()
    collect(tmp_path / "new", EXAMPLES)  # the same records as a format /2 run
    assert list(read_trajectories(tmp_path / "new")) == list(read_trajectories(tmp_path / "run"))


# ------------------------------------------------------------------ shards

def test_shard_examples():
    assert shard_examples("abcdefg", 1, 3) == [(1, "b"), (4, "e")]
    assert [x for s in range(3) for x in shard_examples("abcdefg", s, 3)] != list(enumerate("abcdefg"))
    assert sorted(x for s in range(3) for x in shard_examples("abcdefg", s, 3)) == list(enumerate("abcdefg"))
    with pytest.raises(ConfigError):
        shard_examples("abc", 3, 3)


def test_merge_equals_unsharded_byte_for_byte(tmp_path):
    collect(tmp_path / "whole", EXAMPLES)
    shards = [tmp_path / f"s{i}" for i in range(3)]
    collect(shards[1], EXAMPLES, shard=(1, 3), stop_after=1)  # a shard that was interrupted ...
    for i in (2, 0, 1):
        collect(shards[i], EXAMPLES, shard=(i, 3))  # ... and resumed
    summary = merge_shards(reversed(shards), tmp_path / "merged")
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE, SUMMARY_FILE):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert summary["counts"]["prompts"] == 7
    with pytest.raises(DataError, match="already holds"):
        merge_shards(shards, tmp_path / "merged")


def test_merge_refuses_incomplete_missing_or_mixed_shards(tmp_path):
    shards = [tmp_path / f"s{i}" for i in range(2)]
    collect(shards[0], EXAMPLES, shard=(0, 2))
    collect(shards[1], EXAMPLES, shard=(1, 2), stop_after=2)
    with pytest.raises(DataError, match="incomplete"):
        merge_shards(shards, tmp_path / "m1")
    collect(shards[1], EXAMPLES, shard=(1, 2))
    with pytest.raises(DataError, match=r"need each of 0..1"):
        merge_shards(shards[:1], tmp_path / "m2")
    other = tmp_path / "other"
    with TrajectoryWriter(other, {**FP, "seed": 1}, shard=(1, 2)) as w:
        w.close(complete=True)
    with pytest.raises(DataError, match="other settings"):
        merge_shards([shards[0], other], tmp_path / "m3")
    merge_shards(shards, tmp_path / "m4")


def test_legacy_shards_merge_into_the_new_layout(tmp_path):
    collect(tmp_path / "whole", EXAMPLES)
    shards = [tmp_path / f"s{i}" for i in range(2)]
    for i, shard in enumerate(shards):  # shards begun by the old collector: its summary, no records yet
        shard.mkdir()
        summary = {"format": LEGACY_FORMAT, "fingerprint": FP, "shard": {"index": i, "count": 2}, "complete": False,
                   "counts": {"prompts": 0, "records": 0, "dropped_repetitive": 0}}  # fmt: skip
        (shard / SUMMARY_FILE).write_text(json.dumps(summary))
        collect(shard, EXAMPLES, shard=(i, 2))  # resumed by the new code: still in format /1
        assert b'"done"' in (shard / TRAJECTORIES_FILE).read_bytes() and not (shard / PROGRESS_FILE).exists()
    merge_shards(shards, tmp_path / "merged")
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE, SUMMARY_FILE):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
