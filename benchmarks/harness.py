"""What every benchmark shares: its prompt sets, best-of-N timing, the machine, and its JSON output.

A benchmark is a script in speed/ (how fast: ours against what users would otherwise run, in one run
on one machine) or studies/ (what a method does: outputs, agreement, drift). Each one:

    args = harness.parser(__doc__, out="reports/bench/NAME.json").parse_args()
    ... measure, using harness.gsm8k_prompts and harness.best_of ...
    harness.write(args.out, rows, args)          # rows + the machine + the command line, as JSON

and prints a table with ratios against its baseline. Run from the repository root:
`python benchmarks/speed/NAME.py` (the scripts put the root on sys.path themselves).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a script run as benchmarks/x/y.py imports the package from the checkout
    sys.path.insert(0, str(ROOT))

from cllm_jax.data.sources import load_prompts  # noqa: E402
from cllm_jax.decode.prefill import bucket_length  # noqa: E402
from cllm_jax.evaluate.machine import describe_machine  # noqa: E402


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=out, help="where the JSON goes (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    return p


def gsm8k_prompts(tokenizer, count: int, bucket: int = 128) -> list[list[int]]:
    """The first `count` held-out GSM8K questions whose chat prompt fits one length bucket: one
    compilation, so a short benchmark measures decoding, not the compiler."""
    chosen = []
    for example in load_prompts("gsm8k-eval"):
        ids = tokenizer.chat_ids(example.prompt)
        if bucket_length(len(ids)) == bucket:
            chosen.append(ids)
        if len(chosen) == count:
            break
    return chosen


def best_of(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
    """Seconds of `fn()` (which must block until its work is done): best and median of `repeats`
    runs after `warmup` untimed ones. The best is the figure least disturbed by a shared machine."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best": min(times), "median": statistics.median(times), "runs": times}


def write(path: str | Path, rows: list[dict] | dict, args: argparse.Namespace | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": describe_machine(), "command": " ".join(sys.argv), "rows": rows}
    if args is not None:
        payload["arguments"] = vars(args)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (heading, key, format spec)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, spec) if spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
