"""The held-out tasks an evaluation measures quality on: their prompts and how an answer is judged.

- gsm8k: the held-out GSM8K problems under the chat template; an answer is correct when its final
  number (the one after '####', else the last) equals the reference's. "Same final answer"
  compares those numbers between a method and the base model.
- humaneval: the HumanEval problems under the chat prompt of cllm_jax/data/humaneval.py; an
  answer is correct when its extracted code passes the problem's tests, run in a sandboxed process.
  Each distinct (problem, answer) is executed once, whichever rows produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from cllm_jax.data.humaneval import chat_prompt, humaneval_problems
from cllm_jax.data.prompts import extract_final_number, gsm8k_final_answer
from cllm_jax.data.sources import load_prompts
from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.humaneval import check_completions


@dataclasses.dataclass(frozen=True)
class Judged:
    correct: Callable[[int, list[int]], bool]  # (prompt index, generated tokens) -> right?
    final_answer: Callable[[list[int]], object] | None  # what "same final answer" compares; None: no such thing
    details: dict  # for evaluation.json: e.g. each executed answer's status


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    ids: list  # the problems' ids (GSM8K line numbers, HumanEval task ids), in prompt order
    prompts: list[list[int]]  # token ids under the chat template
    judge: Callable  # (runs, decode) -> Judged


def load_task(name: str, dataset: str | None, limit: int | None, tokenizer) -> Task:
    if name == "gsm8k":
        examples = load_prompts(dataset or "gsm8k-eval", limit=limit)
        truth = [gsm8k_final_answer(e.answer) if e.answer else None for e in examples]

        def judge(runs, decode) -> Judged:
            def answer(tokens):
                return extract_final_number(decode(tokens))

            return Judged(lambda i, tokens: (a := answer(tokens)) is not None and a == truth[i], answer, {})

        return Task(name, [e.data_id for e in examples], [tokenizer.chat_ids(e.prompt) for e in examples], judge)
    if name == "humaneval":
        if dataset not in (None, "humaneval"):
            raise ConfigError(f"evaluate.task=humaneval reads the HumanEval problems, not {dataset!r}: drop "
                              f"evaluate.dataset")
        problems = humaneval_problems()[:limit]

        def judge(runs, decode) -> Judged:
            distinct = sorted({(i, tuple(t)) for run in runs for i, t in zip(run.indices, run.token_ids)})
            results = check_completions([problems[i] for i, _ in distinct], [decode(list(t)) for _, t in distinct])
            verdict = dict(zip(distinct, results))
            details = {"executed": len(distinct), "statuses": {s: sum(r.status == s for r in results)
                                                                for s in {r.status for r in results}}}
            return Judged(lambda i, tokens: verdict[(i, tuple(tokens))].passed, None, details)

        return Task(name, [p.task_id for p in problems], [tokenizer.chat_ids(chat_prompt(p)) for p in problems],
                    judge)
    raise ConfigError(f"unknown evaluation task {name!r} (choose gsm8k or humaneval)")
