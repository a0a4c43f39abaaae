"""Code-generation prompts for collecting trajectories, kept apart from HumanEval (the evaluation).

Two sources, both available offline:

* ShareGPT: first human turns that ask for Python code: they name Python (`python`, a ```python
  fence or a `def name(` line), contain a request verb (write, implement, fix, ...) and are at most
  2000 characters. data_id "sharegpt:<position in the file>"; exact repeats are kept once.
* The standard library's own source (sysconfig.get_paths()["stdlib"], minus test, tests, idlelib,
  tkinter, lib2to3, turtledemo and site-packages directories): public top-level functions and public
  methods of public top-level classes that have a docstring of 80-1500 characters, a simple
  signature (no decorators, *args, **kwargs or keyword-only parameters, at most five parameters
  besides self/cls, constant defaults) and a body of 2-60 lines. The prompt shows the signature and
  docstring exactly as written (a method under its `class Name:` line), body removed, in HumanEval's
  chat wording (cllm_jax.data.humaneval.PROMPT_TEMPLATE); answer = the original source.
  data_id "stdlib:json/decoder.py:py_scanstring" or "stdlib:json/decoder.py:JSONDecoder.raw_decode".
  The set is whatever the stdlib of the running Python holds: another Python version gives
  another set (3.11.7 here), but the rules and every id's split do not change.

Contamination. A candidate is dropped when it has a HumanEval problem's function name together
with its docstring, or shares any 8-gram with a HumanEval prompt or canonical solution; an 8-gram
is 8 consecutive tokens of `text.split()` (whitespace-separated, case and punctuation kept),
checked over the candidate's prompt and answer. `code_prompts_report()` counts the drops.

Split. An id goes to the held-out part when the first 8 bytes of sha256("cllm-code-split-v1:<id>")
read as an integer fall below 5% of 2**64: a per-id rule, so an id never changes sides whatever
else the set holds. `code_prompts("collect")` interleaves the sources in proportion (every prefix
has both, in the ratio of the whole) and is what collection reads; "eval" is held out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from cllm_jax.data.humaneval import PROMPT_TEMPLATE, humaneval
from cllm_jax.data.prompts import PromptExample, sharegpt
from cllm_jax.errors import DataError

CODE_SPLIT_KEY = "cllm-code-split-v1"
CODE_EVAL_FRACTION = 0.05
NGRAM = 8
MAX_SHAREGPT_CHARS = 2000
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "tkinter", "lib2to3", "turtledemo", "site-packages",
                       "dist-packages", "__pycache__"})
DOCSTRING_CHARS = (40, 1500)
BODY_LINES = (1, 60)
MAX_PARAMS = 6

_NAMES_PYTHON = re.compile(r"\bpython\b|```\s*py(?:thon)?\b|^\s*def \w+\(", re.IGNORECASE | re.MULTILINE)
_ASKS_FOR_CODE = re.compile(r"\b(?:write|implement|create|fix|debug|complete|refactor|rewrite|convert|modify|"
                            r"optimi[sz]e|generate|build|make|add|update|change|improve|code|script|program|"
                            r"function|class)\b", re.IGNORECASE)


# ---------------------------------------------------------------------------------------- stdlib

def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _simple_signature(fn: ast.FunctionDef, method: bool) -> bool:
    """No *args/**kwargs, at most MAX_PARAMS parameters besides self/cls, defaults constants or dotted names."""
    a = fn.args
    decorators = [ast.unparse(d) for d in fn.decorator_list]
    if a.vararg or a.kwarg or not set(decorators) <= ({"staticmethod", "classmethod"} if method else set()):
        return False
    params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    if method and "staticmethod" not in decorators:
        if not params or params[0] != ("cls" if "classmethod" in decorators else "self"):
            return False
        params = params[1:]
    defaults = a.defaults + [d for d in a.kw_defaults if d is not None]
    return len(params) <= MAX_PARAMS and all(_simple_default(d) for d in defaults)


def _simple_default(node: ast.expr) -> bool:
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, (ast.Constant, ast.Name))


def function_task(source_lines: list[str], fn: ast.FunctionDef, class_name: str | None = None) -> str | None:
    """The signature and docstring of `fn` as written, body removed; None if it does not qualify.

    source_lines: the module's lines, line ends kept.
    """
    doc = ast.get_docstring(fn)
    if not doc or not DOCSTRING_CHARS[0] <= len(doc) <= DOCSTRING_CHARS[1]:
        return None
    if not _simple_signature(fn, method=class_name is not None):
        return None
    doc_node, body = fn.body[0], fn.body[1:]
    body_lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
    if not BODY_LINES[0] <= body_lines <= BODY_LINES[1]:
        return None
    first = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
    head = textwrap.dedent("".join(source_lines[first - 1 : doc_node.end_lineno]))
    if class_name is not None:
        head = f"class {class_name}:\n" + textwrap.indent(head, "    ")
    return head.rstrip() + "\n"


def stdlib_functions(root: str | os.PathLike | None = None) -> Iterable[tuple[str, str, str, str]]:
    """(data_id, task code, original source, docstring) per qualifying function, files in sorted order."""
    root = Path(root) if root is not None else stdlib_root()
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(f for f in files if f.endswith(".py")):
            path = Path(directory) / name
            yield from functions_in_source(path.read_bytes(), path.relative_to(root).as_posix())


def functions_in_source(source: bytes | str, rel_path: str) -> Iterable[tuple[str, str, str, str]]:
    """The qualifying functions of one module's source (see `stdlib_functions`)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return  # a few stdlib files are templates or data; nothing to take from them
    text = source.decode("utf-8", "replace") if isinstance(source, bytes) else source
    # Lines as ast counts them: str.splitlines would also break at form feeds, which some modules hold.
    lines, seen = io.StringIO(text, newline="").readlines(), set()

    def emit(fn, qualname, class_name=None):
        task = function_task(lines, fn, class_name)
        data_id = f"stdlib:{rel_path}:{qualname}"
        if task is not None and data_id not in seen:  # of redefinitions, the first that qualifies
            seen.add(data_id)
            first = fn.decorator_list[0].lineno if fn.decorator_list else fn.lineno
            return data_id, task, textwrap.dedent("".join(lines[first - 1 : fn.end_lineno])), ast.get_docstring(fn)
        return None

    for node in tree.body:
        found = []
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            found.append(emit(node, node.name))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
                    found.append(emit(item, f"{node.name}.{item.name}", node.name))
        yield from (f for f in found if f is not None)


# ---------------------------------------------------------------------------------------- ShareGPT

def asks_for_python(prompt: str) -> bool:
    return (len(prompt) <= MAX_SHAREGPT_CHARS and _NAMES_PYTHON.search(prompt) is not None
            and _ASKS_FOR_CODE.search(prompt) is not None)


def sharegpt_python() -> Iterable[PromptExample]:
    seen = set()
    for example in sharegpt():
        if asks_for_python(example.prompt) and example.prompt.strip() not in seen:
            seen.add(example.prompt.strip())
            yield PromptExample(f"sharegpt:{example.data_id}", example.prompt, example.answer)


# ---------------------------------------------------------------------------------------- contamination

def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    tokens = text.split()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


@functools.lru_cache(maxsize=1)
def humaneval_fingerprints() -> tuple[frozenset, frozenset]:
    """(8-grams of every HumanEval prompt and canonical solution, {(entry point name, docstring)})."""
    grams, named_docs = set(), set()
    for problem in humaneval():
        grams |= ngrams(problem.prompt) | ngrams(problem.answer or "")
        for node in ast.walk(ast.parse(problem.prompt)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
                named_docs.add((node.name, " ".join(ast.get_docstring(node).split())))
    return frozenset(grams), frozenset(named_docs)


def contaminated(text: str, name_and_doc: tuple[str, str] | None = None) -> bool:
    grams, named_docs = humaneval_fingerprints()
    if name_and_doc is not None and (name_and_doc[0], " ".join(name_and_doc[1].split())) in named_docs:
        return True
    tokens = text.split()
    return any(tuple(tokens[i : i + NGRAM]) in grams for i in range(len(tokens) - NGRAM + 1))


# ---------------------------------------------------------------------------------------- the set

CODE_ORDER_KEY = "cllm-code-order-v1"


def is_held_out(data_id: str) -> bool:
    digest = hashlib.sha256(f"{CODE_SPLIT_KEY}:{data_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < CODE_EVAL_FRACTION * 2**64


@dataclass(frozen=True)
class CodePromptSet:
    sharegpt: tuple[PromptExample, ...]
    stdlib: tuple[PromptExample, ...]
    dropped: dict  # source -> candidates dropped by the contamination check


@functools.lru_cache(maxsize=1)
def _code_prompt_set() -> CodePromptSet:
    dropped = {"sharegpt": 0, "stdlib": 0}
    kept_sharegpt, kept_stdlib = [], []
    for example in sharegpt_python():
        if contaminated(example.prompt + "\n" + (example.answer or "")):
            dropped["sharegpt"] += 1
        else:
            kept_sharegpt.append(example)
    for data_id, task, original, doc in stdlib_functions():
        name = data_id.rsplit(":", 1)[1].rsplit(".", 1)[-1]
        if contaminated(task + "\n" + original, (name, doc)):
            dropped["stdlib"] += 1
        else:
            kept_stdlib.append(PromptExample(data_id, PROMPT_TEMPLATE.format(prompt=task.rstrip()), original))
    if not kept_stdlib:
        raise DataError(f"no standard-library functions found under {stdlib_root()}: the code prompts need "
                        f"the Python sources (install the python3 package that ships the .py files)")
    return CodePromptSet(tuple(kept_sharegpt), tuple(kept_stdlib), dropped)


def _interleave(*sources: list) -> list:
    """Merge lists so that every prefix holds each in proportion to its length (stable, deterministic)."""
    keyed = [((i + 0.5) / len(s), k, i, x) for k, s in enumerate(sources) for i, x in enumerate(s)]
    return [x for *_, x in sorted(keyed, key=lambda t: t[:3])]


def _order_key(example: PromptExample) -> bytes:
    return hashlib.sha256(f"{CODE_ORDER_KEY}:{example.data_id}".encode()).digest()


def code_prompts(split: str = "collect") -> list[PromptExample]:
    """The code prompts of one split: "collect" (about 95%) or "eval" (held out, about 5%).

    Each source is put in a fixed pseudo-random order (a hash of the id) before interleaving, so
    the first N prompts sample the whole standard library, not its first modules alphabetically."""
    if split not in ("collect", "eval"):
        raise DataError(f"code split must be 'collect' or 'eval', not {split!r}")
    s = _code_prompt_set()
    want = split == "eval"
    parts = [sorted((e for e in source if is_held_out(e.data_id) == want), key=_order_key)
             for source in (s.sharegpt, s.stdlib)]
    return _interleave(*parts)


def code_prompts_report() -> dict:
    """Counts per source and split, and the contamination drops."""
    s = _code_prompt_set()
    counts = {name: {"collect": sum(not is_held_out(e.data_id) for e in source),
                     "eval": sum(is_held_out(e.data_id) for e in source)}
              for name, source in (("sharegpt", s.sharegpt), ("stdlib", s.stdlib))}
    return {"counts": counts, "dropped": dict(s.dropped), "stdlib_root": str(stdlib_root())}
