"""An ablation of the training recipe: one pipeline run per row, every row at the same budget.

    python train.py ablation --config configs/ablation_gsm8k.yaml [--rows today,ar_prompt_masked]

The config names a pipeline recipe, a `budget` (overrides every row gets, so rows differ in nothing
but their own change) and `rows` (name -> overrides). Rows share one collection of the base model's
trajectories, so they differ only in training. Row NAME runs in RUN_DIR/NAME and reports to
REPORT_DIR/rows/NAME/; a row whose report.json exists is done and skipped without loading a model.
Only the reports are small enough to commit, so an ablation longer than one sitting is staged: each
sitting runs the rows that are missing, and the table is rebuilt from every finished row.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.pipeline import PipelineConfig, load_pipeline_config
from cllm_jax.train.config import read_yaml


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    pipeline: Path  # the recipe every row starts from
    run_dir: Path
    report_dir: Path
    budget: tuple[str, ...]  # overrides shared by every row
    rows: dict[str, tuple[str, ...]]  # row name -> its own overrides, in table order
    note: str = ""  # the budget in words, printed above the table


def load_ablation_config(path: str | Path) -> AblationConfig:
    values = read_yaml(path, kind="ablation config", sections="pipeline, run_dir, budget, rows, ...")
    known = {f.name for f in dataclasses.fields(AblationConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]} in {path} (valid: {', '.join(sorted(known))})")
    rows = values.get("rows") or {}
    if not rows:
        raise ConfigError(f"{path} has no rows: add `rows: {{name: [key=value, ...]}}`")
    return AblationConfig(
        pipeline=Path(values["pipeline"]),
        run_dir=Path(values.get("run_dir", "runs/ablation")),
        report_dir=Path(values.get("report_dir", "reports/ablation")),
        budget=tuple(values.get("budget") or ()),
        rows={name: tuple(overrides or ()) for name, overrides in rows.items()},
        note=values.get("note", ""),
    )


def row_config(ablation: AblationConfig, name: str) -> PipelineConfig:
    overrides = [*ablation.budget, *ablation.rows[name], f"run_dir={ablation.run_dir / name}",
                 f"report_dir={ablation.report_dir / 'rows' / name}"]  # fmt: skip
    return load_pipeline_config(ablation.pipeline, overrides)


def _share_collection(ablation: AblationConfig, config: PipelineConfig) -> None:
    """Point the row's trajectories at the shared collection (the first row to run fills it)."""
    shared = (ablation.run_dir / "trajectories").resolve()
    shared.mkdir(parents=True, exist_ok=True)
    link = config.trajectories_dir
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(shared, link.parent), link)


def run_ablation(ablation: AblationConfig, rows: list[str] | None = None, say: Callable[[str], Any] = print,
                 on_batch=None) -> dict:  # fmt: skip
    """Run the rows not yet reported (all, or `rows`), then rebuild the table; returns it."""
    from cllm_jax.evaluate.pipeline import run_pipeline

    names = rows or list(ablation.rows)
    missing = [n for n in names if n not in ablation.rows]
    if missing:
        raise ConfigError(f"no row {missing[0]!r} in the ablation (rows: {', '.join(ablation.rows)})")
    for name in names:
        config = row_config(ablation, name)
        if (config.report_dir / "report.json").is_file():
            say(f"== {name}: done ({config.report_dir})")
            continue
        say(f"== {name}: {' '.join(ablation.rows[name]) or '(the recipe as it is)'}")
        _share_collection(ablation, config)
        run_pipeline(config, say=say, on_batch=on_batch)
    return write_table(ablation)


# The table's columns: (heading, method name in report.json, field)
_TPF = [("fixed", "jacobi (cllm)"), ("rolling", "jacobi-rolling (cllm)"),
        ("multiblock", "jacobi-multiblock (cllm)"), ("mb + recycling", "jacobi-multiblock + recycling (cllm)")]


def _method(methods: dict, name: str, n: int | None) -> dict | None:
    return methods.get(f"{name} n={n}") or (methods.get(name) if n is None or methods.get(name, {}).get(
        "block_size") in (None, n) else None)  # fmt: skip


def summarise_row(report: dict, train_metrics: list[dict]) -> dict:
    """One table row: TPF per decoding method at the largest n, the fastest CLLM method per n,
    quality of that fastest method, training minutes."""
    methods = report["methods"]
    sizes = sorted({m.get("block_size") for m in methods.values() if m.get("block_size")}) or [None]
    largest = sizes[-1]
    row: dict[str, Any] = {"tpf": {}, "speed": {}}
    for heading, name in _TPF:
        m = _method(methods, name, largest)
        row["tpf"][heading] = None if m is None else m["tpf"]
    best = None
    for n in sizes:
        candidates = [m for _, name in _TPF if (m := _method(methods, name, n)) is not None]
        if candidates:
            fastest = max(candidates, key=lambda m: m["tokens_per_second"])
            row["speed"][str(n)] = {"tokens_per_second": fastest["tokens_per_second"], "speedup": fastest["speedup"]}
            if best is None or fastest["speedup"] > best["speedup"]:
                best = fastest
    best = best or {}
    row["accuracy"] = best.get("accuracy")
    row["agreement"] = (best.get("agreement") or {}).get("final_answer")
    row["base_nll_ratio"] = best.get("base_nll_ratio")
    row["block_size"] = largest
    row["train_minutes"] = sum(m.get("step_time_s", 0.0) for m in train_metrics) / 60
    return row


def _fmt(value, spec=".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def write_table(ablation: AblationConfig) -> dict:
    """report.md / report.json / a TPF plot from every finished row (unfinished rows are listed as such)."""
    from cllm_jax.evaluate.plots import plot_method_bars

    table = {}
    for name in ablation.rows:
        row_dir = ablation.report_dir / "rows" / name
        if (row_dir / "report.json").is_file():
            report = json.loads((row_dir / "report.json").read_text())
            metrics_file = row_dir / "train_metrics.jsonl"  # the pipeline's copy of the run's metrics.jsonl
            metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
            table[name] = summarise_row(report, metrics)
        else:
            table[name] = None
    ablation.report_dir.mkdir(parents=True, exist_ok=True)
    done = {k: v for k, v in table.items() if v}
    sizes = sorted({n for row in done.values() for n in row["speed"]}, key=int) if done else []
    head = ["row", *[f"TPF {h}" for h, _ in _TPF], *[f"tok/s, speedup n={n}" for n in sizes],
            "accuracy", "answer agreement", "base_nll_ratio", "train min", "overrides"]  # fmt: skip
    lines = ["# Ablation: consistency-training recipe, GSM8K held-out", "", ablation.note, "",
             f"Recipe: `{ablation.pipeline}`; budget for every row: `{' '.join(ablation.budget)}`.",
             "TPF at the largest block size; speed and quality of the fastest CLLM method.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for name, row in table.items():
        overrides = " ".join(f"`{o}`" for o in ablation.rows[name]) or "(recipe)"
        if row is None:
            lines.append(f"| {name} | " + " | ".join(["not run"] * (len(head) - 2)) + f" | {overrides} |")
            continue
        speeds = [f"{_fmt(s['tokens_per_second'], '.1f')}, {_fmt(s['speedup'])}x" if (s := row["speed"].get(n))
                  else "n/a" for n in sizes]  # fmt: skip
        pct = lambda v: "n/a" if v is None else f"{v:.0%}"  # noqa: E731
        lines.append("| " + " | ".join([name, *[_fmt(v) for v in row["tpf"].values()], *speeds, pct(row["accuracy"]),
                                        pct(row["agreement"]), _fmt(row["base_nll_ratio"], ".3f"),
                                        _fmt(row["train_minutes"], ".0f"), overrides]) + " |")  # fmt: skip
    (ablation.report_dir / "report.md").write_text("\n".join(lines) + "\n")
    (ablation.report_dir / "report.json").write_text(json.dumps(table, indent=2) + "\n")
    if done:
        heads = [h for h, _ in _TPF]
        plot_method_bars(list(done), {f"TPF {h}": [done[n]["tpf"][h] or 0.0 for n in done] for h in heads},
                         ablation.report_dir / "tpf.png", title=ablation.note[:120])  # fmt: skip
    return table
