"""The CLLM result end to end: collect trajectories, train, evaluate on held-out prompts, report.

Each stage writes under RUN_DIR and resumes where it stopped; a stage whose output is complete is
skipped, so rerunning the same command after a kill (or after the whole run) costs nothing extra.

    RUN_DIR/trajectories/   decode.py collect output (GSM8K collection split)
    RUN_DIR/train/          train.py run (orbax checkpoints, metrics.jsonl, export/)
    RUN_DIR/evaluation-REPORT.json  the held-out evaluation (REPORT: the report directory's name)
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
from cllm_jax.data.sources import load_prompts
from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.evaluation import EvalSettings, Row
from cllm_jax.train.config import TrainConfig, apply_overrides, config_from_dict, read_yaml, unknown_key


@dataclasses.dataclass(frozen=True, kw_only=True)
class CollectStage:
    dataset: str = "gsm8k"  # the collection split: never the held-out part
    limit: int | None = None
    options: CollectOptions = CollectOptions()


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateStage:
    task: str = "gsm8k"  # gsm8k (final-number accuracy) | humaneval (pass@1 by executing the tests)
    dataset: str | None = None  # the held-out prompts (default: gsm8k-eval, or the 164 HumanEval problems)
    limit: int | None = 50
    # max_new_tokens, block_sizes, timing_limit, batch_size, include_transformers, prompt_lookup_num_tokens:
    # written in the section beside the keys below (load_pipeline_config)
    settings: EvalSettings = EvalSettings()
    # The rows: {weights: base | cllm | a variant | a name of `models`, method: NAME, <its options>,
    # full: true}. Default: the standard set (`standard_rows`), shaped by `lookup` and `recycle`.
    rows: list[dict] | None = None
    lookup: bool = True  # standard rows: rolling Jacobi with lookup guesses, base model and CLLM
    recycle: int = 4  # standard rows: the multiblock + recycling row's pool (0: no such row)
    models: dict[str, str] = dataclasses.field(default_factory=dict)  # more weights: name -> model path
    mesh: str | None = None  # "data=D,tensor=T": decode the rows over a device mesh (None: one device)

    def __post_init__(self):
        if self.mesh is not None:  # a mistyped mesh fails when the config loads, not after training
            from cllm_jax.parallel.decode_mesh import parse_mesh

            parse_mesh(self.mesh)
        if self.task not in ("gsm8k", "humaneval"):
            raise ConfigError(f"evaluate.task={self.task!r} is not one of gsm8k, humaneval")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"evaluate.limit must be >= 1 (or null: all), got {self.limit}")
        try:
            rows = self.row_specs(trained=True)
        except ConfigError as error:
            raise ConfigError(f"evaluate.rows: {error}") from None
        for row in rows:  # every row's options, checked before any stage runs
            try:
                row.make_options(block_size=min(row.block_sizes or self.settings.block_sizes),
                                 max_new_tokens=self.settings.max_new_tokens)
            except ConfigError as error:
                raise ConfigError(f"evaluate: the row {row.name(None, False)}: {error}") from None

    def row_specs(self, trained: bool) -> list[Row]:
        if self.rows is None:
            return standard_rows(self.lookup, self.recycle, trained)
        if not isinstance(self.rows, list) or not all(isinstance(r, dict) for r in self.rows):
            raise ConfigError("evaluate.rows must be a list of mappings such as {weights: base, method: ar}")
        return [Row.from_dict(r) for r in self.rows]


def standard_rows(lookup: bool, recycle: int, trained: bool) -> list[Row]:
    """Our AR and Jacobi on the base model, and every Jacobi method on the trained CLLM."""
    ps = (("init", "prefix-sample"),)
    rows = [Row(weights="base", method="ar"), Row(weights="base", method="jacobi", options=ps)]
    if lookup:  # what lookup alone gives, without consistency training
        rows.append(Row(weights="base", method="jacobi-rolling", options=(("init", "lookup"),)))
    if trained:
        rows += [Row(weights="cllm", method=m, options=ps) for m in ("jacobi", "jacobi-rolling", "jacobi-multiblock")]
        if recycle:  # on a CPU each candidate row costs a whole window
            rows.append(Row(weights="cllm", method="jacobi-multiblock", options=ps + (("recycle", recycle),)))
        if lookup:
            rows.append(Row(weights="cllm", method="jacobi-rolling", options=(("init", "lookup"),)))
    return rows


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    run_dir: Path
    report_dir: Path
    model: str | None
    collect: CollectStage
    train: TrainConfig
    evaluate: EvaluateStage
    source: dict  # the YAML as written, saved with the report
    second_round: "SecondRound | None" = None  # collect again with the trained model, train on
    variants: dict[str, TrainConfig] = dataclasses.field(default_factory=dict)  # more trainings, same data

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


@dataclasses.dataclass(frozen=True, kw_only=True)
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
    collect: CollectStage
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


def _evaluate_stage(values: dict | None) -> EvaluateStage:
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    valid = {f.name for f in dataclasses.fields(EvaluateStage)} - {"settings"} | names  # settings: written flat
    unknown = sorted(set(values) - valid)
    if unknown:
        raise unknown_key(unknown[0], valid, "evaluate")
    settings = EvalSettings(**{k: values.pop(k) for k in list(values) if k in names})
    return EvaluateStage(**values, settings=settings)


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
    return SecondRound(dir=stage_dir, collect=stage, train=train)


def _collect_and_train(model, stage: CollectStage, stage_dir: Path, train: TrainConfig, label: str,
                       say: Callable[[str], Any], on_batch):  # fmt: skip
    """One round's collect and train stages (each resumed, or skipped when complete); returns the
    collection summary and the trained model."""
    from cllm_jax.train.loop import run as train_run
    from cllm_jax.weights.load import load_model

    say(f"[1/4] {label}collect: {stage.dataset}, n = {stage.options.block_size} -> {stage_dir / 'trajectories'}")
    summary = collect(model, load_prompts(stage.dataset, limit=stage.limit), stage_dir / "trajectories", stage.options,
                      source=stage.dataset, on_batch=on_batch)  # fmt: skip
    say(f"      {summary['records']} records, {summary['mean_states_per_block']:.1f} states per block")
    if (Path(train.run_dir) / "export.json").is_file():  # written once the export (a model or an adapter) is complete
        say(f"[2/4] {label}train: done ({Path(train.run_dir) / 'export'})")
    else:
        say(f"[2/4] {label}train -> {train.run_dir}")
        train_run(train)
    return summary, load_model(train.run_dir)


PIPELINE_SECTIONS = {"run_dir", "report_dir", "model", "collect", "train", "variants", "second_round", "evaluate",
                     "extends"}


def _read_sections(path: str | Path, seen: tuple = ()) -> dict:
    """A pipeline YAML's sections; `extends: OTHER.yaml` starts from OTHER's (sections merged key by
    key, lists replaced), so a report config can add rows and trainings to a recipe without copying it."""
    values = read_yaml(path, sections="run_dir, collect, train, evaluate, ...")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    parent_path = Path(path).parent / parent if not Path(parent).is_absolute() else Path(parent)
    if parent_path.resolve() in seen:
        raise ConfigError(f"{path} extends {parent}, which extends it back")
    return _merge(_read_sections(parent_path, seen + (parent_path.resolve(),)), values)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_pipeline_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    values = _read_sections(path, (Path(path).resolve(),))
    values = apply_overrides(values, list(overrides))
    unknown = sorted(set(values) - PIPELINE_SECTIONS)
    if unknown:
        raise unknown_key(unknown[0], PIPELINE_SECTIONS)
    run_dir = Path(values.get("run_dir", "runs/pipeline"))
    train_values = dict(values.get("train") or {})
    variants = {}
    for name, changes in (values.get("variants") or {}).items():
        if not isinstance(changes, dict) or name in ("base", "cllm"):
            raise ConfigError(f"variants.{name} must be a mapping of train overrides, named other than base/cllm")
        variants[name] = config_from_dict(apply_overrides(train_values, [
            *_dotted(changes), f"run_dir={run_dir / 'variants' / name}",
            f"data.trajectories=[{run_dir / 'trajectories'}]",
            f"model.path={values.get('model') if values.get('model') is not None else 'null'}",
        ]))  # fmt: skip
    return PipelineConfig(
        run_dir=run_dir,
        report_dir=Path(values.get("report_dir", run_dir / "report")),
        model=values.get("model"),
        collect=_collect_stage(values.get("collect"), "collect"),
        train=_stage_train(train_values, run_dir, values.get("model")),
        evaluate=_evaluate_stage(values.get("evaluate")),
        source=values,
        second_round=_second_round(values.get("second_round"), run_dir, values.get("collect"), train_values),
        variants=variants,
    )


STAGES = ("collect", "train", "evaluate", "report")


def run_pipeline(config: PipelineConfig, say: Callable[[str], Any] = print, on_batch=None,
                 stop_after: str = "report") -> dict | None:
    """Run (or resume) every stage up to `stop_after`; returns report.json's content (None if stopped early)."""
    from cllm_jax.evaluate.report import write_report
    from cllm_jax.train.loop import run as train_run
    from cllm_jax.weights.load import load_model

    if stop_after not in STAGES:
        raise ConfigError(f"stop_after {stop_after!r} is not one of {', '.join(STAGES)}")
    base = load_model(config.model)
    c = config.collect
    if stop_after == "collect":
        say(f"[1/4] collect: {c.dataset}, n = {c.options.block_size} -> {config.trajectories_dir}")
        collect(base, load_prompts(c.dataset, limit=c.limit), config.trajectories_dir, c.options, source=c.dataset,
                on_batch=on_batch)  # fmt: skip
        return None
    summary, cllm = _collect_and_train(base, c, config.run_dir, config.train, "", say, on_batch)
    if (r := config.second_round) is not None:
        _, cllm = _collect_and_train(cllm, r.collect, r.dir, r.train, "round 2 ", say, on_batch)
    models = {"base": base, "cllm": cllm}
    for name, train in config.variants.items():
        if not (Path(train.run_dir) / "export.json").is_file():
            say(f"[2/4] train variant {name} -> {train.run_dir}")
            train_run(train)
        models[name] = load_model(train.run_dir)
    if stop_after == "train":
        return None
    for name, path in config.evaluate.models.items():
        models[name] = load_model(path)
    evaluation = evaluate_stage(config, models, say)
    if stop_after == "evaluate":
        return None
    say(f"[4/4] report -> {config.report_dir}")
    config.report_dir.mkdir(parents=True, exist_ok=True)
    (config.report_dir / "config.yaml").write_text(yaml.safe_dump(config.source, sort_keys=False))
    metrics_file = config.train_dir / "metrics.jsonl"
    if metrics_file.is_file():
        shutil.copy(metrics_file, config.report_dir / "train_metrics.jsonl")
    cllm_dir = config.second_round.train_dir if config.second_round is not None else config.train_dir
    trained = {"cllm": cllm_dir} | {name: Path(t.run_dir) for name, t in config.variants.items()}
    return write_report(config, evaluation, summary, models, trained)


def evaluate_stage(config: PipelineConfig, models: dict, say: Callable[[str], Any]) -> dict:
    """RUN_DIR/evaluation-REPORT.json: every row's generations and figures (one file per report, so
    configs that share a run, a recipe and its fuller report, each keep their own). Each finished row
    is kept in RUN_DIR/evaluation/ as it ends, so a killed evaluation resumes at the row it was in and
    a row two reports share is decoded once."""
    from cllm_jax.evaluate import tasks
    from cllm_jax.evaluate.evaluation import run_rows, score
    from cllm_jax.evaluate.report import trajectory_panels

    evaluation_file = config.run_dir / f"evaluation-{config.report_dir.name}.json"
    if evaluation_file.is_file():
        say(f"[3/4] evaluate: done ({evaluation_file})")
        return json.loads(evaluation_file.read_text())
    e = config.evaluate
    task = tasks.load_task(e.task, e.dataset, e.limit, models["base"].tokenizer)
    settings = e.settings
    from cllm_jax.parallel import decode_mesh

    with decode_mesh.using(decode_mesh.mesh_from_text(e.mesh)):
        runs = run_rows(models, e.row_specs("cllm" in models), task.prompts, settings,
                        progress=lambda name: say(f"[3/4] evaluate: {name}"), keep_dir=config.run_dir / "evaluation")
    decode = models["base"].tokenizer.decode
    judged = task.judge(runs, decode)
    evaluation = {
        "task": e.task,
        "problems": task.ids,
        "methods": score(runs, judged.correct, judged.final_answer),
        "runs": [dataclasses.asdict(run) | {"correct": [judged.correct(i, t) for i, t in zip(run.indices,
                                                                                                 run.token_ids)]}
                 for run in runs],
        "judged": judged.details,
    }
    cllm = models.get("cllm")
    if e.task == "gsm8k" and cllm is not None and cllm.model.adapter is None:
        evaluation["trajectories"] = trajectory_panels(models["base"], cllm, task.prompts[0],
                                                       max(settings.block_sizes), settings.max_new_tokens)
    tmp = evaluation_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(evaluation))
    tmp.replace(evaluation_file)  # atomic: a killed evaluation leaves no half file to skip over
    return evaluation
