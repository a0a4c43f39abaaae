"""HumanEval's problems and the chat prompt they are asked in: the one reader of the problem file.

A problem's prompt (imports, signature, docstring) goes to the model as one user message:

    Complete the following Python function. Return the whole function in one ```python code block.

    ```python
    <problem prompt, trailing whitespace stripped>
    ```

The same wording asks the code-collection prompts (cllm_jax/data/code_prompts.py), so that training
sees the question as the evaluation asks it. Running answers against the tests is the evaluation's
(cllm_jax/evaluate/humaneval.py).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Iterator

from cllm_jax.data.prompts import PromptExample, asset_path

PROMPT_TEMPLATE = (
    "Complete the following Python function. Return the whole function in one ```python code block."
    "\n\n```python\n{prompt}\n```"
)


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def humaneval_problems() -> list[HumanEvalProblem]:
    """The 164 problems with their tests."""
    with gzip.open(asset_path("humaneval"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [HumanEvalProblem(**{k: r[k] for k in HumanEvalProblem.__dataclass_fields__}) for r in rows]


def chat_prompt(problem: HumanEvalProblem) -> str:
    return PROMPT_TEMPLATE.format(prompt=problem.prompt.rstrip())


def humaneval() -> Iterator[PromptExample]:
    """The problems as prompts: data_id = task_id, prompt = the problem's prompt as written (no chat
    wording), answer = canonical_solution."""
    for problem in humaneval_problems():
        yield PromptExample(problem.task_id, problem.prompt, problem.canonical_solution)
