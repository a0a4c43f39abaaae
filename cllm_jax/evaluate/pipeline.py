"""The CLLM result end to end: collect trajectories, train, evaluate on held-out prompts, report.

Each stage writes under RUN_DIR and resumes where it stopped; a stage whose output is complete is
skipped, so rerunning the same command after a kill (or after the whole run) costs nothing extra.

    RUN_DIR/trajectories/   decode.py collect output (GSM8K collection split)
    RUN_DIR/train/          train.py run (orbax checkpoints, metrics.jsonl, export/)
    RUN_DIR/evaluation.json the held-out evaluation
    REPORT_DIR/             report.md, report.json, plots, the config
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import yaml

from cllm_jax.data.collect import CollectOptions, collect
from cllm_jax.data.prompts import load_prompts
from cllm_jax.errors import ConfigError
from cllm_jax.train.config import TrainConfig, apply_overrides, config_from_dict, unknown_key
from cllm_jax.train.rounds import SecondRound, parse_second_round, run_second_round


@dataclasses.dataclass(frozen=True)
class CollectStage:
    dataset: str = "gsm8k"  # the collection split: never the held-out part
    limit: int | None = None
    options: CollectOptions = CollectOptions()


@dataclasses.dataclass(frozen=True)
class EvaluateStage:
    dataset: str = "gsm8k-eval"
    limit: int | None = 50
    max_new_tokens: int = 256
    block_size: int = 16
    prompt_lookup_num_tokens: int = 10
    include_transformers: bool = True
    block_sizes: list[int] | None = None  # every Jacobi method at each n, e.g. [8, 16] (default: block_size)
    blocks: int = 2  # multiblock: K blocks in flight
    spawn_ratio: float = 0.85
    recycle: int = 4  # multiblock + recycling: the pool of rejected tails (0: leave that method out)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    run_dir: Path
    report_dir: Path
    model: str | None
    collect: CollectStage
    train: TrainConfig
    evaluate: EvaluateStage
    source: dict  # the YAML as written, saved with the report
    second_round: SecondRound | None = None  # collect again with the trained model, train on (train/rounds.py)

    @property
    def trajectories_dir(self) -> Path:
        return self.run_dir / "trajectories"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"


def _section(cls, values: dict | None, name: str, also_valid: tuple[str, ...] = ()):
    """`cls` built from a section's values; `also_valid`: keys the caller took out before."""
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise unknown_key(unknown[0], names | set(also_valid), name)
    return cls(**values)


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    values = apply_overrides(values, list(overrides))
    run_dir = Path(values.get("run_dir", "runs/pipeline"))
    collect_values = dict(values.get("collect") or {})
    collect_stage = CollectStage(
        dataset=collect_values.pop("dataset", "gsm8k"),
        limit=collect_values.pop("limit", None),
        options=_section(CollectOptions, collect_values, "collect", also_valid=("dataset", "limit")),
    )
    if collect_stage.dataset == "gsm8k-eval":
        raise ConfigError("collect.dataset must not be the held-out gsm8k-eval split")
    train_values = apply_overrides(dict(values.get("train") or {}), [
        f"run_dir={run_dir / 'train'}",
        f"data.trajectories=[{run_dir / 'trajectories'}]",
        f"model.path={values.get('model') if values.get('model') is not None else 'null'}",
    ])  # fmt: skip
    return PipelineConfig(
        run_dir=run_dir,
        report_dir=Path(values.get("report_dir", run_dir / "report")),
        model=values.get("model"),
        collect=collect_stage,
        train=config_from_dict(train_values),
        evaluate=_section(EvaluateStage, values.get("evaluate"), "evaluate"),
        source=values,
        second_round=parse_second_round(values.get("second_round"), run_dir, values.get("collect"), train_values),
    )


def run_pipeline(config: PipelineConfig, say: Callable[[str], Any] = print, on_batch=None) -> dict:
    """Run (or resume) every stage; returns report.json's content."""
    from cllm_jax.evaluate.evaluation import EvalSettings, run_methods, score
    from cllm_jax.evaluate.report import trajectory_panels, write_report
    from cllm_jax.train.loop import run as train_run
    from cllm_jax.weights.load import load_model

    base = load_model(config.model)
    say(f"[1/4] collect: {config.collect.dataset} -> {config.trajectories_dir}")
    examples = load_prompts(config.collect.dataset, limit=config.collect.limit)
    summary = collect(base, examples, config.trajectories_dir, config.collect.options,
                      source=config.collect.dataset, on_batch=on_batch)  # fmt: skip
    say(f"      {summary['records']} records, {summary['mean_states_per_block']:.1f} states per block")

    export = config.train_dir / "export"
    if (export / "config.json").is_file():
        say(f"[2/4] train: done ({export})")
    else:
        say(f"[2/4] train -> {config.train_dir}")
        train_run(config.train)
    cllm = load_model(config.train_dir)
    if config.second_round is not None:
        cllm = run_second_round(config.second_round, cllm, say, on_batch)

    evaluation_file = config.run_dir / "evaluation.json"
    held_out = load_prompts(config.evaluate.dataset, limit=config.evaluate.limit)
    if evaluation_file.is_file():
        say(f"[3/4] evaluate: done ({evaluation_file})")
        evaluation = json.loads(evaluation_file.read_text())
    else:
        e = config.evaluate
        prompts = [base.tokenizer.chat_ids(x.prompt) for x in held_out]
        settings = EvalSettings(e.max_new_tokens, e.block_size, e.prompt_lookup_num_tokens, e.include_transformers,
                                tuple(e.block_sizes or ()), e.blocks, e.spawn_ratio, e.recycle)  # fmt: skip
        runs = run_methods(base, cllm, prompts, settings, progress=lambda name: say(f"[3/4] evaluate: {name}"))
        evaluation = {
            "methods": score(runs, held_out, base.tokenizer.decode),
            "trajectories": trajectory_panels(base, cllm, prompts[0], e.block_size, e.max_new_tokens),
        }
        tmp = evaluation_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(evaluation, indent=1))
        tmp.replace(evaluation_file)  # atomic: a killed evaluation leaves no half file to skip over

    say(f"[4/4] report -> {config.report_dir}")
    config.report_dir.mkdir(parents=True, exist_ok=True)
    (config.report_dir / "config.yaml").write_text(yaml.safe_dump(config.source, sort_keys=False))
    metrics_file = config.train_dir / "metrics.jsonl"
    if metrics_file.is_file():
        shutil.copy(metrics_file, config.report_dir / "train_metrics.jsonl")
    return write_report(config, evaluation, summary, len(held_out))
