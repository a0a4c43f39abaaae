"""Trajectory collection end to end: records against the engine and AR, resume after kill -9, shards."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cllm_jax.data.collect import CollectOptions, collect
from cllm_jax.data.prompts import PromptExample
from cllm_jax.data.trajectories import PROGRESS_FILE, TRAJECTORIES_FILE, read_trajectories
from cllm_jax.decode.engine import Decoder
from cllm_jax.errors import DataError
from cllm_jax.weights.load import load_model
from tests.tiny import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_KEYS = {"data_id", "jacobian_itr_id", "prompt_ids_len", "prompt_ids", "answer_trajectory_ids",
                  "teacher_output_ids", "complete_teacher_output_ids", "labels_ids"}  # the reference schema
QUESTIONS = [f"What is {a} plus {b}? Explain." for a, b in [(2, 3), (17, 25), (100, 1), (8, 8), (41, 1), (6, 77)]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "tiny"
    save_tiny_chat_model(path)
    return path


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "questions.jsonl"
    path.write_text("".join(json.dumps({"prompt": q, "answer": str(i)}) + "\n" for i, q in enumerate(QUESTIONS)))
    return path


def examples():
    return [PromptExample(i, q, str(i)) for i, q in enumerate(QUESTIONS)]


OPTIONS = CollectOptions(block_size=8, max_new_tokens=40, batch_size=2, clean=False)


def test_records_match_the_engine_and_greedy_ar(loaded, tmp_path):
    summary = collect(loaded, examples(), tmp_path / "run", OPTIONS, source="test")
    records = list(read_trajectories(tmp_path / "run"))
    with open(tmp_path / "run" / TRAJECTORIES_FILE) as f:  # a plain JSON-lines reader sees records only
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(records) and all(set(row) == REFERENCE_KEYS for row in rows)
    assert summary["records"] == len(records) == 6 * 5  # 40 tokens in blocks of 8, no EOS in a tiny random model
    tokenizer = loaded.tokenizer
    ar = Decoder(loaded.model, **dict(method="ar", max_new_tokens=40, eos_id=tokenizer.eos_token_id))
    for example in examples():
        mine = sorted((r for r in records if r.data_id == example.data_id), key=lambda r: r.jacobian_itr_id)
        prompt = tokenizer.chat_ids(example.prompt)
        (greedy,) = ar.generate([prompt])
        assert mine[0].complete_teacher_output_ids == tuple(prompt + greedy.token_ids)
        prefix = list(prompt)
        for k, record in enumerate(mine):
            n = OPTIONS.block_size
            assert record.jacobian_itr_id == k and record.prompt_ids_len == len(prompt)
            assert list(record.prompt_ids) == prefix  # the prefix grows block by block
            assert list(record.answer_trajectory_ids[-1]) == greedy.token_ids[k * n : (k + 1) * n]
            assert record.teacher_output_ids == record.prompt_ids + record.answer_trajectory_ids[-1]
            assert all(len(state) == n for state in record.answer_trajectory_ids)
            assert record.answer_trajectory_ids[0][0] == record.answer_trajectory_ids[-1][0]
            assert list(record.labels_ids) == prompt + tokenizer.encode(str(example.data_id)) + [tokenizer.eos_token_id]
            prefix += list(record.answer_trajectory_ids[-1])
    assert summary["mean_states_per_block"] > 1


def test_another_model_in_the_output_directory_is_refused(loaded, tmp_path, model_dir):
    collect(loaded, examples()[:1], tmp_path / "run", OPTIONS, source="test")
    other = CollectOptions(block_size=4, max_new_tokens=40, batch_size=2, clean=False)
    with pytest.raises(DataError, match="different model or different options"):
        collect(loaded, examples()[:1], tmp_path / "run", other, source="test")


def collect_cli(model_dir, prompts_file, out, *extra):
    return [sys.executable, str(ROOT / "decode.py"), "collect", "--model", str(model_dir), "--prompts",
            str(prompts_file), "--answer-field", "answer", "--out", str(out), "--block-size", "8",
            "--max-new-tokens", "40", "--batch-size", "1", "--no-clean", *extra]  # fmt: skip


def test_kill_and_resume_gives_the_uninterrupted_file(model_dir, prompts_file, tmp_path):
    whole = subprocess.run(collect_cli(model_dir, prompts_file, tmp_path / "whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    progress = tmp_path / "killed" / PROGRESS_FILE
    process = subprocess.Popen(collect_cli(model_dir, prompts_file, tmp_path / "killed"), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (progress.exists() and progress.read_text().count("\n") >= 2):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = progress.read_text().count("\n")
    assert 2 <= partial < len(QUESTIONS), "the kill must land mid-run for this test to mean anything"
    resumed = subprocess.run(collect_cli(model_dir, prompts_file, tmp_path / "killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_shards_then_merge_equal_an_unsharded_run(loaded, tmp_path):
    collect(loaded, examples(), tmp_path / "whole", OPTIONS, source="test")
    for i in range(3):
        collect(loaded, examples(), tmp_path / f"shard{i}", OPTIONS, source="test", shard=(i, 3))
    from cllm_jax.data.trajectories import merge_shards

    merge_shards([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged")
    merged = (tmp_path / "merged" / TRAJECTORIES_FILE).read_bytes()
    assert merged == (tmp_path / "whole" / TRAJECTORIES_FILE).read_bytes()


def test_unknown_dataset_is_a_one_line_error(model_dir, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "decode.py"), "collect", "--model", str(model_dir),
                          "--dataset", "nope", "--out", str(tmp_path / "x")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and "nope" in out.stderr
