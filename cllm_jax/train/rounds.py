"""A second training round: re-collect trajectories with the trained model, then train on from it.

Jacobi Forcing's curriculum (arXiv 2512.14681): train at n = 16, collect again with that model at
n = 32, train again. A model's fixed points stop being its own while it trains (the greedy output
drifts); collecting anew gives the second round targets that the trained model really converges to,
and longer trajectories at the larger n. A pipeline config turns it on with

    second_round:
      collect: {block_size: 32}      # replaces keys of the first round's collect section
      train: {optim: {lr: 1.0e-4}}   # merged into the first round's train section

Layout (each stage resumes or is skipped like the first round's):
    RUN_DIR/round2/trajectories/  collected with RUN_DIR/train's model
    RUN_DIR/round2/train/         initialised from RUN_DIR/train's weights
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from cllm_jax.data.collect import CollectOptions, collect
from cllm_jax.data.prompts import load_prompts
from cllm_jax.errors import ConfigError
from cllm_jax.train.config import TrainConfig, apply_overrides, config_from_dict


@dataclasses.dataclass(frozen=True)
class SecondRound:
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


def _dotted(values: dict, prefix: str = "") -> list[str]:
    """`a.b=value` overrides (YAML flow values) that merge a nested mapping key by key."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")  # JSON is YAML
    return out


def parse_second_round(values: dict | None, run_dir: Path, collect_values: dict | None,
                       train_values: dict) -> SecondRound | None:
    """The second round of a pipeline config (None when the config has no `second_round`)."""
    if values is None:
        return None
    if not isinstance(values, dict) or set(values) - {"collect", "train"}:
        raise ConfigError("second_round takes a mapping with the keys collect and train "
                          "(e.g. second_round: {collect: {block_size: 32}})")
    stage_dir = run_dir / "round2"
    collect_all = {**(collect_values or {}), **(values.get("collect") or {})}
    dataset, limit = collect_all.pop("dataset", "gsm8k"), collect_all.pop("limit", None)
    names = {f.name for f in dataclasses.fields(CollectOptions)}
    unknown = sorted(set(collect_all) - names)
    if unknown:
        raise ConfigError(f"unknown key second_round.collect.{unknown[0]} (valid: dataset, limit, "
                          f"{', '.join(sorted(names))})")
    if dataset == "gsm8k-eval":
        raise ConfigError("second_round.collect.dataset must not be the held-out gsm8k-eval split")
    train = apply_overrides(train_values, _dotted(values.get("train") or {}, "") + [
        f"run_dir={stage_dir / 'train'}",
        f"data.trajectories=[{stage_dir / 'trajectories'}]",
        f"model.path={run_dir / 'train'}",  # the first round's run: training starts from its export
    ])  # fmt: skip
    return SecondRound(stage_dir, dataset, limit, CollectOptions(**collect_all), config_from_dict(train))


def run_second_round(stage: SecondRound, model, say: Callable[[str], Any] = print, on_batch=None):
    """Collect with `model` (the first round's LoadedModel), train; returns the final LoadedModel."""
    from cllm_jax.train.loop import run as train_run
    from cllm_jax.weights.load import load_model

    say(f"[2/4] round 2 collect: {stage.dataset}, n = {stage.options.block_size} -> {stage.trajectories_dir}")
    examples = load_prompts(stage.dataset, limit=stage.limit)
    summary = collect(model, examples, stage.trajectories_dir, stage.options, source=stage.dataset,
                      on_batch=on_batch)
    say(f"      {summary['records']} records, {summary['mean_states_per_block']:.1f} states per block")
    export = stage.train_dir / "export"
    if (export / "config.json").is_file():
        say(f"[2/4] round 2 train: done ({export})")
    else:
        say(f"[2/4] round 2 train -> {stage.train_dir}")
        train_run(stage.train)
    return load_model(stage.train_dir)
