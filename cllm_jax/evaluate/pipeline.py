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
    lookup: bool = True  # rolling Jacobi with prompt-lookup guesses, on the base model and the CLLM


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    run_dir: Path
    report_dir: Path
    model: str | None
    collect: CollectStage
    train: TrainConfig
    evaluate: EvaluateStage
    source: dict  # the YAML as written, saved with the report
    second_round: "SecondRound | None" = None  # collect again with the trained model, train on

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


@dataclasses.dataclass(frozen=True)
class SecondRound:
    """Jacobi Forcing's curriculum (train at n = 16, collect again with that model at n = 32, train on):
    a trained model's fixed points stop being the base model's, so collecting anew gives the second
    round targets the trained model really converges to. In a pipeline config:

        second_round:
          collect: {block_size: 32}      # replaces keys of the first round's collect section
          train: {optim: {lr: 1.0e-4}}   # merged into the first round's train section

    It runs in RUN_DIR/round2/{trajectories,train}, training from RUN_DIR/train's export; each stage
    resumes or is skipped like the first round's."""

    dir: Path
    dataset: str
    limit: int | None
    options: CollectOptions
    train: TrainConfig

    @property
    def trajectories_dir(self) -> Path:
        return self.dir / "trajectories"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"


def _collect_stage(values: dict | None, section: str) -> CollectStage:
    values = dict(values or {})
    stage = CollectStage(
        dataset=values.pop("dataset", "gsm8k"),
        limit=values.pop("limit", None),
        options=_section(CollectOptions, values, section, also_valid=("dataset", "limit")),
    )
    if stage.dataset == "gsm8k-eval":
        raise ConfigError(f"{section}.dataset must not be the held-out gsm8k-eval split")
    return stage


def _stage_train(train_values: dict, stage_dir: Path, model_path, extra: list[str] = ()) -> TrainConfig:
    """A stage's training config: trains on the stage's own trajectories, in its own run directory."""
    return config_from_dict(apply_overrides(train_values, [
        *extra,
        f"run_dir={stage_dir / 'train'}",
        f"data.trajectories=[{stage_dir / 'trajectories'}]",
        f"model.path={model_path if model_path is not None else 'null'}",
    ]))  # fmt: skip


def _dotted(values: dict, prefix: str = "") -> list[str]:
    """`a.b=value` overrides (YAML flow values) that merge a nested mapping key by key."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML
    return out


def _second_round(values: dict | None, run_dir: Path, collect_values: dict | None, train_values: dict):
    if values is None:
        return None
    if not isinstance(values, dict) or set(values) - {"collect", "train"}:
        raise ConfigError("second_round takes a mapping with the keys collect and train "
                          "(e.g. second_round: {collect: {block_size: 32}})")
    stage = _collect_stage({**(collect_values or {}), **(values.get("collect") or {})}, "second_round.collect")
    stage_dir = run_dir / "round2"
    train = _stage_train(train_values, stage_dir, run_dir / "train", _dotted(values.get("train") or {}))
    return SecondRound(stage_dir, stage.dataset, stage.limit, stage.options, train)


def _collect_and_train(model, dataset: str, limit, options: CollectOptions, stage_dir: Path, train: TrainConfig,
                       label: str, say: Callable[[str], Any], on_batch):  # fmt: skip
    """One round's collect and train stages (each resumed, or skipped when complete); returns the
    collection summary and the trained model."""
    from cllm_jax.train.loop import run as train_run
    from cllm_jax.weights.load import load_model

    say(f"[1/4] {label}collect: {dataset}, n = {options.block_size} -> {stage_dir / 'trajectories'}")
    summary = collect(model, load_prompts(dataset, limit=limit), stage_dir / "trajectories", options,
                      source=dataset, on_batch=on_batch)  # fmt: skip
    say(f"      {summary['records']} records, {summary['mean_states_per_block']:.1f} states per block")
    export = Path(train.run_dir) / "export"
    if (export / "config.json").is_file():
        say(f"[2/4] {label}train: done ({export})")
    else:
        say(f"[2/4] {label}train -> {train.run_dir}")
        train_run(train)
    return summary, load_model(train.run_dir)


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    values = apply_overrides(values, list(overrides))
    run_dir = Path(values.get("run_dir", "runs/pipeline"))
    train_values = dict(values.get("train") or {})
    return PipelineConfig(
        run_dir=run_dir,
        report_dir=Path(values.get("report_dir", run_dir / "report")),
        model=values.get("model"),
        collect=_collect_stage(values.get("collect"), "collect"),
        train=_stage_train(train_values, run_dir, values.get("model")),
        evaluate=_section(EvaluateStage, values.get("evaluate"), "evaluate"),
        source=values,
        second_round=_second_round(values.get("second_round"), run_dir, values.get("collect"), train_values),
    )


def run_pipeline(config: PipelineConfig, say: Callable[[str], Any] = print, on_batch=None) -> dict:
    """Run (or resume) every stage; returns report.json's content."""
    from cllm_jax.evaluate.evaluation import EvalSettings, run_methods, score
    from cllm_jax.evaluate.report import trajectory_panels, write_report
    from cllm_jax.weights.load import load_model

    base = load_model(config.model)
    c = config.collect
    summary, cllm = _collect_and_train(base, c.dataset, c.limit, c.options, config.run_dir, config.train, "", say,
                                       on_batch)  # fmt: skip
    if (r := config.second_round) is not None:
        _, cllm = _collect_and_train(cllm, r.dataset, r.limit, r.options, r.dir, r.train, "round 2 ", say, on_batch)

    evaluation_file = config.run_dir / "evaluation.json"
    held_out = load_prompts(config.evaluate.dataset, limit=config.evaluate.limit)
    if evaluation_file.is_file():
        say(f"[3/4] evaluate: done ({evaluation_file})")
        evaluation = json.loads(evaluation_file.read_text())
    else:
        e = config.evaluate
        prompts = [base.tokenizer.chat_ids(x.prompt) for x in held_out]
        settings = EvalSettings(e.max_new_tokens, e.block_size, e.prompt_lookup_num_tokens, e.include_transformers,
                                tuple(e.block_sizes or ()), e.blocks, e.spawn_ratio, e.recycle, e.lookup)  # fmt: skip
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
