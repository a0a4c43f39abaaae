"""HumanEval by execution: canonical solutions pass, and the sandbox stops loops, memory, writes and sockets."""

import dataclasses
import time

import pytest

from cllm_jax.data.humaneval import chat_prompt, humaneval_problems
from cllm_jax.evaluate.humaneval import (ExecResult, canonical_code, check_completions, check_programs, extract_code,
                                         pass_at_1, program_text, run_program)


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in humaneval_problems()}


def test_all_164_canonical_solutions_pass(problems):
    start = time.perf_counter()
    results = check_programs([program_text(p, canonical_code(p)) for p in problems.values()], workers=2)
    assert len(results) == 164 and pass_at_1(results) == 1.0, [r for r in results if not r.passed][:3]
    assert time.perf_counter() - start < 60


def test_wrong_solution_fails_and_results_are_frozen(problems):
    p = problems["HumanEval/0"]
    result = run_program(program_text(p, p.prompt + "    return False\n"))
    assert (result.passed, result.status, result.detail) == (False, "failed", "AssertionError")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.passed = True


def test_infinite_loop_times_out_within_the_limit():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", timeout_s=1.5)
    assert result.status == "timeout" and not result.passed
    assert time.perf_counter() - start < 4
    cpu = run_program("while True:\n    pass\n", timeout_s=30, cpu_s=1)  # the CPU-time limit comes first here
    assert cpu.status == "timeout" and "CPU" in cpu.detail, cpu


def test_allocating_many_gib_is_stopped_as_memory():
    result = run_program("blocks = [bytearray(1 << 30) for _ in range(16)]\n")
    assert result.status == "memory", result


def test_writing_outside_the_temporary_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"try:\n    open({str(target)!r}, 'w').write('x')\nexcept Exception:\n    pass\n"  # swallowed: still refused
    result = run_program(code)
    assert result.status == "error" and "refused" in result.detail and str(target) in result.detail
    assert not target.exists()
    removal = run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n")
    assert removal.status == "error" and tmp_path.is_dir()
    inside = run_program("import os, tempfile\nopen('f.txt', 'w').write('x')\nos.mkdir('d')\ntempfile.mkstemp()\n")
    assert inside.passed, inside  # its own directory is writable


def test_sockets_and_processes_are_refused():
    sock = run_program("import socket\nsocket.socket().connect(('127.0.0.1', 9))\n")
    assert sock.status == "error" and "socket" in sock.detail
    proc = run_program("import os\nos.system('true')\n")
    assert proc.status == "error" and "os.system" in proc.detail


def test_exiting_early_is_not_a_pass(problems):
    p = problems["HumanEval/0"]
    assert run_program(program_text(p, "import sys\nsys.exit(0)\n")).status == "failed"


def test_chat_prompt_wording(problems):
    p = problems["HumanEval/2"]
    assert chat_prompt(p) == ("Complete the following Python function. Return the whole function in one ```python "
                              f"code block.\n\n```python\n{p.prompt.rstrip()}\n```")


def test_code_extraction(problems):
    p = problems["HumanEval/0"]  # its prompt imports List from typing
    whole = p.prompt + p.canonical_solution
    without_imports = whole.split("\n\n\n", 1)[1]
    assert "import" not in without_imports
    answers = {
        "fenced": f"Here it is:\n```python\n{whole}```\nIt compares every pair.",
        "fenced, no imports": f"```python\n{without_imports}\n```",
        "plain fence, unclosed": f"```\n{without_imports}",
        "body only": p.canonical_solution,
        "no fence": whole,
    }
    for name, answer in answers.items():
        code = extract_code(answer, p)
        assert "def has_close_elements(" in code and "It compares" not in code, name
        assert code.startswith("from typing import List") and code.count("import List") == 1, name
    results = check_completions([p] * len(answers), list(answers.values()))
    assert [r.status for r in results] == ["passed"] * len(answers)
    # The first ```python block wins over an earlier plain one.
    two = f"```\nprint('not this')\n```\n```python\n{whole}```"
    assert extract_code(two, p).count("print('not this')") == 0
    assert isinstance(results[0], ExecResult)
