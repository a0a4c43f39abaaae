"""Prompt sources by name: the built-in datasets, else a JSONL file; the one table of them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterator

from cllm_jax.data.code_prompts import code_prompts
from cllm_jax.data.humaneval import humaneval
from cllm_jax.data.prompts import PromptExample, gsm8k, jsonl_file, sharegpt
from cllm_jax.errors import DataError

SOURCES: dict[str, Callable[[], Iterator[PromptExample]]] = {
    "gsm8k": lambda: gsm8k("collect"),
    "gsm8k-eval": lambda: gsm8k("eval"),
    "sharegpt": sharegpt,
    "humaneval": humaneval,
    "code": lambda: iter(code_prompts("collect")),  # Python requests from ShareGPT and the standard library
    "code-eval": lambda: iter(code_prompts("eval")),
}
DATASET_NAMES = tuple(SOURCES)


def load_prompts(name_or_path: str | Path, limit: int | None = None, **kwargs) -> list[PromptExample]:
    """Prompts of a named dataset or a JSONL file, at most `limit` of them, in source order.

    Names: SOURCES ('gsm8k' and 'code' are the collection splits, '-eval' their held-out parts).
    Anything else is read as a JSONL path; kwargs (prompt_field, answer_field, id_field) go to
    `jsonl_file`.
    """
    name = str(name_or_path)
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, not {limit}")
    if name in SOURCES:
        if kwargs:
            raise DataError(f"options {sorted(kwargs)} apply to JSONL files, not to dataset '{name}'")
        examples = SOURCES[name]()
    elif Path(name).is_file():
        examples = jsonl_file(name, **kwargs)
    elif name.endswith((".jsonl", ".json")):
        raise DataError(f"{name}: no such file; pass a dataset name ({', '.join(DATASET_NAMES)}) "
                        f"or the path of a JSONL file")
    elif Path(name).is_dir():
        raise DataError(f"{name} is a directory: give a JSONL file with one {{\"prompt\": ...}} per line, or a "
                        f"dataset name ({', '.join(DATASET_NAMES)})")
    else:
        raise DataError(f"unknown dataset {name!r}: valid names are {', '.join(DATASET_NAMES)}, "
                        f"or give the path of a JSONL file with one {{\"prompt\": ...}} per line")
    return list(itertools.islice(examples, limit))
