"""HumanEval by execution: code extraction from an answer, and a sandboxed runner. The problems and
the prompt they are asked in are cllm_jax/data/humaneval.py's.

Extraction (`extract_code`). The first ```python block, else the first ``` block, else the whole
answer; a fence the answer never closes (the token budget ran out) runs to the end. Code that does
not define the entry point is taken as its body and put under the problem's prompt; code that
does gets the prompt's preamble (imports, helper functions) in front, so a model that leaves out
`from typing import List` is not failed for it.

Execution (`run_program`). `solution + test + check(entry_point)` runs in a separate `python -I -B`
process, in a fresh temporary directory deleted afterwards, under a wall-clock limit, RLIMIT_AS
(memory), RLIMIT_CPU and RLIMIT_FSIZE. Before the program starts, the child installs an audit
hook (which no Python code can remove) that refuses sockets, new processes, signals to other
processes, ctypes, raising the resource limits, and every write, rename, delete, mkdir, chmod or
link outside the temporary directory. Audit hooks stop what generated code does by accident or
carelessness; they are not a boundary against code written to escape them (an opened directory
used as dir_fd for os.open, for one), so run untrusted code at scale inside a container as well.

Greedy pass@1 is the fraction of problems whose one completion passes (`pass_at_1`).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cllm_jax.data.humaneval import HumanEvalProblem

STATUSES = ("passed", "failed", "timeout", "memory", "error")
_MEMORY_EXIT, _REFUSED_EXIT = 3, 4


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # one of STATUSES
    detail: str  # a short reason: the exception line, the limit hit, the refused operation


# ---------------------------------------------------------------------------------------- extraction

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def _defines(code: str, name: str) -> re.Match | None:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE)


def extract_code(answer: str, problem: HumanEvalProblem) -> str:
    """The program text for a model's answer (see the module docstring for the rules)."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(answer)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    code = python[0] if python else blocks[0][1] if blocks else answer
    code = textwrap.dedent(code).strip("\n")
    start = _defines(problem.prompt, problem.entry_point)
    if _defines(code, problem.entry_point):
        preamble = problem.prompt[: start.start()] if start else ""
        if preamble.strip() in code:  # the answer repeats it already (or there is none)
            preamble = ""
        return preamble + code + "\n"
    # A bare body: re-indent it under the signature and docstring.
    return problem.prompt.rstrip() + "\n" + textwrap.indent(code, "    ") + "\n"


def program_text(problem: HumanEvalProblem, code: str) -> str:
    """What runs: the solution, the problem's tests, then the call that runs them."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def canonical_code(problem: HumanEvalProblem) -> str:
    return problem.prompt + problem.canonical_solution


# ---------------------------------------------------------------------------------------- execution

# Runs in the child: limits, then the hook, then the program. argv: root, nonce, memory, cpu, fsize.
_BOOTSTRAP = r'''
import os, resource, sys
root, nonce = os.path.realpath(sys.argv[1]), sys.argv[2]
memory, cpu, fsize = map(int, sys.argv[3:6])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
with open(os.path.join(root, "program.py"), encoding="utf-8") as f:
    source = f.read()
refused = []
DENY = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "pty.", "ctypes.", "resource.setrlimit", "resource.prlimit")
# event -> (position of a path that must lie inside root, position of its dir_fd or None), per path
PATHS = {"os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)],
         "os.link": [(0, 2), (1, 3)], "os.symlink": [(1, 2)], "os.chmod": [(0, 2)], "os.chown": [(0, 3)],
         "os.utime": [(0, 3)], "os.truncate": [(0, None)], "os.setxattr": [(0, None)],
         "os.removexattr": [(0, None)]}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def inside(path, dir_fd=None):
    if isinstance(path, int):
        return True  # an open descriptor: its open was checked
    # Relative to dir_fd when one is given (shutil.rmtree walks by descriptor), else to the cwd.
    base = os.readlink("/proc/self/fd/%d" % dir_fd) if isinstance(dir_fd, int) and dir_fd >= 0 else os.getcwd()
    full = os.path.realpath(os.path.join(base, os.fsdecode(path)))
    return full == root or full.startswith(root + os.sep)

def refuse(what):
    refused.append(what)
    raise PermissionError("sandbox refused " + what)

def hook(event, args):
    if event.startswith(DENY) or (event == "import" and args[0] in ("_posixsubprocess", "_ctypes")):
        refuse(event if event != "import" else "import " + args[0])
    elif event == "open" and args[0] is not None:
        path, mode, flags = args
        writes = (isinstance(flags, int) and flags & WRITE_FLAGS) or any(c in (mode or "") for c in "wax+")
        if writes and not inside(path):
            refuse("open(%r, %r)" % (path, mode))
    elif event in PATHS:
        if event in ("os.chmod", "os.chown", "os.utime") and isinstance(args[0], int):
            refuse(event + " on a descriptor")  # fchmod and friends: the descriptor may be a read-only one
        for path_at, dir_fd_at in PATHS[event]:
            if not inside(args[path_at], None if dir_fd_at is None else args[dir_fd_at]):
                refuse("%s(%r)" % (event, args[path_at]))

sys.addaudithook(hook)
code = 0
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__solution__"})
except MemoryError:
    code = 3
except SystemExit as e:
    os.write(2, b"\nSystemExit: the program exited (%r) before its tests finished" % (e.code,))
    code = 1
except BaseException as e:
    os.write(2, ("\n" + type(e).__name__ + (": %s" % e if str(e) else "")).encode("utf-8", "replace")[:2000])
    code = 1
if refused:
    os.write(2, ("\nrefused: " + refused[0]).encode("utf-8", "replace")[:2000])
    code = 4
if code == 0:
    os.write(1, ("\n" + nonce).encode())
os._exit(code)
'''


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path, limit: int = 4096) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace")


def run_program(source: str, timeout_s: float = 10.0, memory_bytes: int = 1 << 30, cpu_s: int | None = None,
                file_bytes: int = 16 << 20) -> ExecResult:
    """Run `source` in the sandbox (module docstring); a clean finish with no refusals is 'passed'."""
    cpu_s = cpu_s if cpu_s is not None else max(1, math.ceil(timeout_s))
    nonce = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="cllm-humaneval-") as tmp:
        root = Path(tmp)
        (root / "program.py").write_text(source, encoding="utf-8")
        out, err = root / "stdout.txt", root / "stderr.txt"
        command = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, tmp, nonce, str(memory_bytes), str(cpu_s),
                   str(file_bytes)]
        # Files, not pipes: a program printing in a loop fills at most file_bytes, not our memory.
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
            try:
                rc = subprocess.run(command, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                    stderr=stderr, timeout=timeout_s).returncode
            except subprocess.TimeoutExpired:
                return ExecResult(False, "timeout", f"wall-clock limit of {timeout_s:g} s")
        last = (_tail(err).strip().splitlines() or [""])[-1][:200]
        if rc == 0 and _tail(out).endswith(nonce):
            return ExecResult(True, "passed", "")
        if rc == 0:
            return ExecResult(False, "failed", "the program exited before its tests finished")
        if rc == _MEMORY_EXIT:
            return ExecResult(False, "memory", f"MemoryError under the {memory_bytes / 2**30:g} GiB limit")
        if rc == _REFUSED_EXIT:
            return ExecResult(False, "error", last)
        if rc in (-9, -24):  # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (SIGXCPU ignored)
            return ExecResult(False, "timeout", f"CPU-time limit of {cpu_s} s")
        if rc < 0:
            return ExecResult(False, "error", f"killed by {_signal_name(-rc)}" + (f" ({last})" if last else ""))
        return ExecResult(False, "failed", last or f"exit status {rc}")


def check_programs(sources: list[str], workers: int = 2, **limits) -> list[ExecResult]:
    """run_program over many programs, `workers` at a time (threads: each one waits on a process)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, **limits), sources))


def check_completions(problems: list[HumanEvalProblem], answers: list[str], workers: int = 2,
                      **limits) -> list[ExecResult]:
    """Extract, assemble and run one model answer per problem."""
    sources = [program_text(p, extract_code(a, p)) for p, a in zip(problems, answers, strict=True)]
    return check_programs(sources, workers=workers, **limits)


def pass_at_1(results: list[ExecResult]) -> float:
    """With one greedy completion per problem, pass@1 is the fraction that passed."""
    return sum(r.passed for r in results) / len(results) if results else 0.0
