"""Code training prompts: a fixed split, no HumanEval overlap, and the stdlib extraction rules."""

import textwrap

import pytest

from cllm_jax.data.code_prompts import (code_prompts, code_prompts_report, contaminated, functions_in_source,
                                        is_held_out)
from cllm_jax.data.humaneval import PROMPT_TEMPLATE, humaneval
from cllm_jax.data.sources import DATASET_NAMES, load_prompts

# Held out by the hash rule (a property of the id alone, whatever the Python version holds).
EVAL_IDS = ["sharegpt:5394", "sharegpt:6216", "stdlib:bisect.py:bisect_right", "stdlib:timeit.py:Timer.repeat"]
COLLECT_IDS = ["sharegpt:43", "stdlib:json/decoder.py:py_scanstring", "stdlib:json/encoder.py:JSONEncoder.encode"]


@pytest.fixture(scope="module")
def splits():
    return code_prompts("collect"), code_prompts("eval")


def test_split_is_disjoint_and_stable(splits):
    collect, held_out = splits
    collect_ids, eval_ids = {e.data_id for e in collect}, {e.data_id for e in held_out}
    assert len(collect_ids) == len(collect) and len(eval_ids) == len(held_out)  # ids are unique
    assert not collect_ids & eval_ids
    assert all(is_held_out(i) for i in EVAL_IDS) and not any(is_held_out(i) for i in COLLECT_IDS)
    assert set(EVAL_IDS) <= eval_ids and set(COLLECT_IDS) <= collect_ids
    assert 0.03 < len(held_out) / (len(collect) + len(held_out)) < 0.07


def test_counts_in_the_thousands_and_a_limit_takes_both_sources(splits):
    counts = code_prompts_report()["counts"]
    assert sum(counts["sharegpt"].values()) >= 200 and sum(counts["stdlib"].values()) >= 2000
    assert len(splits[0]) + len(splits[1]) >= 2500
    first = load_prompts("code", limit=20)
    assert {e.data_id.split(":")[0] for e in first} == {"sharegpt", "stdlib"}
    assert [e.data_id for e in load_prompts("code-eval")] == [e.data_id for e in splits[1]]
    assert {"code", "code-eval"} <= set(DATASET_NAMES)


def test_no_prompt_shares_an_8gram_or_a_function_with_humaneval(splits):
    grams = set()
    for problem in humaneval():  # built here, independently of the module's own check
        for text in (problem.prompt, problem.answer):
            tokens = text.split()
            grams |= {tuple(tokens[i : i + 8]) for i in range(len(tokens) - 7)}
    for example in splits[0] + splits[1]:
        tokens = (example.prompt + "\n" + (example.answer or "")).split()
        assert not any(tuple(tokens[i : i + 8]) in grams for i in range(len(tokens) - 7)), example.data_id
    problem = next(humaneval())
    assert contaminated("some words " + problem.prompt)
    eight = " ".join(problem.prompt.split()[3:11])
    assert contaminated(eight) and not contaminated(" ".join(eight.split()[:7]))


SOURCE = textwrap.dedent('''
    import os


    def count_vowels(text, extra=""):
        """Return how many characters of text are vowels (a, e, i, o, u) or appear in extra."""
        vowels = set("aeiou" + extra)
        return sum(c in vowels for c in text.lower())


    def _private(x):
        """A private helper with a docstring that is long enough to qualify otherwise."""
        return x


    def variadic(*args):
        """Variadic functions are left out: their signature is not a simple one to complete."""
        return args


    class Stack:
        def push(self, item):
            """Put item on the top of the stack and return the new number of items in it."""
            self.items.append(item)
            return len(self.items)
''')


def test_stdlib_extraction_keeps_signature_and_docstring_and_drops_the_body():
    found = {data_id: (task, original) for data_id, task, original, _ in functions_in_source(SOURCE, "demo/mod.py")}
    assert sorted(found) == ["stdlib:demo/mod.py:Stack.push", "stdlib:demo/mod.py:count_vowels"]
    task, original = found["stdlib:demo/mod.py:count_vowels"]
    assert task == ('def count_vowels(text, extra=""):\n'
                    '    """Return how many characters of text are vowels (a, e, i, o, u) or appear in extra."""\n')
    assert original.startswith(task) and "return sum(" in original
    assert found["stdlib:demo/mod.py:Stack.push"][0] == (
        "class Stack:\n    def push(self, item):\n"
        '        """Put item on the top of the stack and return the new number of items in it."""\n')


def test_stdlib_prompt_is_worded_like_humaneval(splits):
    example = next(e for e in splits[0] if e.data_id == "stdlib:json/decoder.py:py_scanstring")
    prefix = PROMPT_TEMPLATE.split("{prompt}")[0]
    assert example.prompt.startswith(prefix)
    code = example.prompt[len(prefix) :]
    assert code.startswith("def py_scanstring(") and code.endswith('"""\n```')
    assert "return" not in code.split('"""')[-1]  # nothing of the body after the docstring
