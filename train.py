"""Consistency training of a LLaMA-family model on Jacobi trajectories.

    python train.py --config configs/smollm2_cpu.yaml
    python train.py --config configs/smollm2_cpu.yaml data.trajectories=[runs/traj] optim.lr=1e-5 run_dir=runs/x
    python train.py pipeline --config configs/smollm2_gsm8k.yaml   # collect -> train -> evaluate -> report
    python train.py ablation --config configs/ablation_gsm8k.yaml  # one pipeline per row, one table

Settings are `key=value` overrides of the YAML recipe (dotted keys, YAML values). Rerunning the same
command resumes the run from its latest checkpoint; the finished model is written to RUN_DIR/export
(load it with `python decode.py --model RUN_DIR`).
"""

from __future__ import annotations

import argparse
import sys


def pipeline_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="train.py pipeline", description="Collect, train, evaluate, report.")
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/smollm2_gsm8k.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. collect.limit=20 train.optim.lr=1e-4")
    parser.add_argument("--stop-after", choices=("collect", "train", "evaluate", "report"), default="report",
                        help="end after this stage (rerun without it to go on)")
    args = parser.parse_args(argv)

    from cllm_jax.cli.common import collect_progress
    from cllm_jax.evaluate.pipeline import load_pipeline_config, run_pipeline

    config = load_pipeline_config(args.config, args.overrides)
    report = run_pipeline(config, on_batch=collect_progress(), stop_after=args.stop_after)
    if report is None:
        print(f"stopped after the {args.stop_after} stage: {config.run_dir}")
        return
    for name, m in report["methods"].items():
        tpf = "n/a " if m["tpf"] is None else f"{m['tpf']:.2f}"
        print(f"{name:<40} TPF {tpf}  {m['tokens_per_second']:6.1f} tok/s  {m['speedup']:.2f}x  acc {m['accuracy']:.1%}")


def ablation_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="train.py ablation", description="Run the rows of an ablation, then its table.")
    parser.add_argument("--config", required=True, help="ablation YAML, e.g. configs/ablation_gsm8k.yaml")
    parser.add_argument("--rows", help="comma-separated row names (default: every row not yet reported)")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from finished rows")
    args = parser.parse_args(argv)

    from cllm_jax.cli.common import collect_progress
    from cllm_jax.evaluate.ablation import load_ablation_config, run_ablation, write_table

    ablation = load_ablation_config(args.config)
    rows = args.rows.split(",") if args.rows else None
    table = write_table(ablation) if args.table_only else run_ablation(ablation, rows, on_batch=collect_progress())
    done = sum(row is not None for row in table.values())
    print(f"{done} of {len(table)} rows reported: {ablation.report_dir / 'report.md'}")


def train_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (see configs/); omitted: built-in defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-5")
    args = parser.parse_args(argv)

    from cllm_jax.train.config import load_config

    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return
    from cllm_jax.train.loop import run

    result = run(config)
    last = result.last_metrics
    summary = f"trained {result.steps} steps in {result.run_dir}"
    if last:
        # each objective names its own terms (consistency and AR, or the drafter's weighted and first-draft loss)
        terms = ", ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in last.items() if k.startswith("loss_"))
        summary += f"; last loss {last['loss']:.4f} ({terms})"
    if result.export_dir is not None:
        summary += f"; model exported to {result.export_dir}"
    print(summary)


def main(argv: list[str] | None = None) -> int:
    from cllm_jax.cli.common import run_commands

    return run_commands(
        sys.argv[1:] if argv is None else argv,
        {"pipeline": pipeline_main, "ablation": ablation_main},
        train_main,
        error_status=1,
        resume_hint="rerun the same command to resume from the latest checkpoint",
    )


if __name__ == "__main__":
    sys.exit(main())
