"""The training loop: data positions, the jitted step, metrics, checkpoints, resume and export.

Run directory layout:
  config.yaml       the resolved TrainConfig (a resumed run must match it, mesh/log/checkpoint aside)
  metrics.jsonl     one JSON line per optimizer step (loss terms, lr, grad norm, tokens/s, step time)
  checkpoints/N/    orbax checkpoints (state + data position)
  tensorboard/      when tensorboardX or torch.utils.tensorboard is installed
  export/           the final model in Hugging Face format (+ tokenizer): decode.py --model RUN_DIR

Step s (0-based) trains on the data position epoch = s // steps_per_epoch, cursor = (s %
steps_per_epoch) * grad_accum * batch_size, and the batch there is a pure function of it, so a
resumed run repeats exactly the losses an uninterrupted run would have had.

A run resumes from its newest checkpoint that restores (a damaged newer one is set aside, with a
CllmWarning), stops at the first unhealthy step (train/health.py: a loss that is not finite, or a
collapse to a uniform prediction) naming a checkpoint that is good, and exports only finite
parameters. Rerunning a finished, exported run writes nothing, so it also works read-only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import yaml
from flax import nnx

from cllm_jax.checkpoint import CHECKPOINT_DIR, EXPORT_DIR, Checkpointer
from cllm_jax.data.storage import read_summary
from cllm_jax.data.trajectories import TrajectoryRecord, read_trajectories
from cllm_jax.errors import CllmError, CllmWarning, ConfigError, DataError, describe_differences
from cllm_jax.model.adapter import LoRAParam, attach as attach_adapter
from cllm_jax.model.llama import merge_adapter
from cllm_jax.model.llama import resolve_layer_loop, stack_layers
from cllm_jax.parallel import distributed, mesh as mesh_lib
from cllm_jax.train import health
from cllm_jax.train import step as step_lib
from cllm_jax.train.batching import BatchSpec, DataSource
from cllm_jax.train.config import TrainConfig
from cllm_jax.train.drafter import DrafterData, DrafterSpec
from cllm_jax.train.metrics_log import MetricsLog, read_metrics

# Sections (and single keys) that may change when a run resumes; anything else must match the stored
# config. The model's speed settings compute the same function: checkpoints fit every choice.
_RESUMABLE_CHANGES = ("run_dir", "mesh", "distributed", "checkpoint", "log", "export",
                      "model.layer_loop", "model.attention", "model.remat")


class TrainingDiverged(CllmError):
    """A loss became NaN or infinite, or the model collapsed to a uniform prediction."""


@dataclasses.dataclass(kw_only=True)
class RunResult:
    run_dir: Path
    steps: int
    last_metrics: dict
    export_dir: Path | None


def load_records(paths) -> list[TrajectoryRecord]:
    if not paths:
        raise ConfigError("data.trajectories is empty: give the collection directories to train on")
    records = []
    for path in paths:
        summary = read_summary(Path(path)) if Path(path).is_dir() else None
        held = list(read_trajectories(path))
        if summary is not None and not summary.get("complete", True):
            # counted from the records: a killed collection's summary still holds the counts it started with
            done = len({r.data_id for r in held})
            warnings.warn(f"{path} is an unfinished collection ({done} prompts so far): training on what it holds; "
                          f"rerun its collection to complete it", CllmWarning, stacklevel=2)
        records.extend(held)
    return records


def _fingerprint(records: list[TrajectoryRecord]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(repr((r.data_id, r.jacobian_itr_id, len(r.prompt_ids), len(r.answer_trajectory_ids))).encode())
    return digest.hexdigest()[:16]


def _check_resume_config(run_dir: Path, config: TrainConfig) -> None:
    stored_file = run_dir / "config.yaml"
    if not stored_file.is_file():
        return
    stored, now = yaml.safe_load(stored_file.read_text(encoding="utf-8")) or {}, config.to_dict()
    # A key missing there (added since the run was written) counts at its default, so that older
    # runs still resume; a new key's default keeps the behaviour from before it (loss.ar_target).
    defaults = TrainConfig().to_dict()

    def stored_value(section: str, key: str):
        return stored.get(section, {}).get(key, defaults[section][key])

    diffs = [f"{section}.{k}: {stored_value(section, k)!r} there, {v!r} now"
             for section, values in now.items() if isinstance(values, dict) and section not in _RESUMABLE_CHANGES
             for k, v in values.items() if stored_value(section, k) != v
             and f"{section}.{k}" not in _RESUMABLE_CHANGES]
    diffs += [f"{k}: {stored.get(k)!r} there, {v!r} now" for k, v in now.items()
              if not isinstance(v, dict) and k not in _RESUMABLE_CHANGES and stored.get(k) != v]
    if diffs:
        raise ConfigError(f"{run_dir} holds a run with another config ({'; '.join(diffs[:3])}); "
                          f"resume with the same settings or choose a new run_dir")


def run(config: TrainConfig, *, model=None, tokenizer=None, records: list[TrajectoryRecord] | None = None,
        devices=None, after_step: Callable[[int], None] | None = None) -> RunResult:
    """Train (or resume) the run in `config.run_dir`; returns when the run is complete and exported.

    `model`/`records` replace loading them from config.model.path / config.data.trajectories;
    `after_step(step)` is called after each optimizer step (tests use it to interrupt a run).
    """
    dist = config.distributed
    distributed.initialize(dist.enabled, dist.coordinator, dist.num_processes, dist.process_id)
    main = distributed.is_main_process()
    run_dir = Path(config.run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    if ckpt_dir.is_dir():
        _check_resume_config(run_dir, config)
    records = load_records(config.data.trajectories) if records is None else list(records)
    if model is None:
        from cllm_jax.weights.load import load_model

        loaded = load_model(config.model.path, config.model.dtype, stacked=True)
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model.config = model.config.replace(dtype=config.model.dtype)
    # Train states and checkpoints hold the stacked layout whichever layer loop runs.
    model = stack_layers(model, resolve_layer_loop(config.model.layer_loop, model.config, training=True))
    model.config = model.config.replace(attention=config.model.attention)
    if main:
        _write_config(run_dir, config)
    eos = config.data.eos_id if config.data.eos_id is not None else model.config.eos_token_id
    spec = BatchSpec.from_config(config, None if eos == -1 else eos)
    data = drafter_data(config, records) if config.drafter.placeholders else DataSource(records, spec)

    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    accum, batch_size = config.optim.grad_accum, config.optim.batch_size
    if batch_size % mesh_lib.batch_divisor(mesh):
        raise ConfigError(f"optim.batch_size={batch_size} must be a multiple of mesh data x fsdp = "
                          f"{mesh_lib.batch_divisor(mesh)}")
    per_step = accum * batch_size
    steps_per_epoch = math.ceil(len(data) / per_step)
    total = config.optim.max_steps or steps_per_epoch * config.optim.epochs
    o = config.optim
    tx, schedule = step_lib.make_optimizer(o, total)
    adapter_config = config.adapter_config()
    frozen = None
    if adapter_config is not None:  # only the adapter trains: the base weights come in frozen
        attach_adapter(model, adapter_config, seed=config.seed)
        graphdef, params, frozen = nnx.split(model, LoRAParam, ...)
    else:
        graphdef, params = nnx.split(model)
    vocab_size = model.config.vocab_size
    shardings = step_lib.state_shardings(params, tx, mesh)
    frozen_shardings = None if frozen is None else mesh_lib.param_shardings(frozen, mesh)
    fingerprint = {"num_examples": len(data), "examples": _fingerprint(records), "layout": spec.layout}

    checkpointer = Checkpointer(ckpt_dir, config.checkpoint.every, config.checkpoint.keep,
                                config.checkpoint.asynchronous)
    abstract = step_lib.abstract_state(jax.eval_shape(lambda: params), tx, shardings)
    try:
        start = checkpointer.latest_step() or 0
        if start >= total and (not config.export or _exported_step(run_dir) == start):  # finished: no writes
            export_dir = run_dir / EXPORT_DIR if config.export else None
            return RunResult(run_dir=run_dir, steps=total, last_metrics=(read_metrics(run_dir) or [{}])[-1],
                             export_dir=export_dir)
        if start:
            start, state, position, notes = checkpointer.restore_newest(abstract)
            for note in notes:
                warnings.warn(note, CllmWarning, stacklevel=2)
            stored = {k: position.get(k) for k in fingerprint}
            if stored != fingerprint:
                raise DataError(f"{run_dir} was trained on other data ({describe_differences(stored, fingerprint)}); "
                                f"resume with the same data.trajectories or choose a new run_dir")
            if (position.get("epoch"), position.get("cursor")) != _position(start, steps_per_epoch, per_step):
                raise DataError(f"the data position saved at step {start} ({position}) does not follow from the "
                                f"batch settings; resume with the same optim.batch_size and grad_accum")
        else:
            state = step_lib.init_state(jax.device_get(params), tx, shardings, config.seed)
        # the loaded model is the base model on a resume too: checkpoints hold only the trained one
        extra = []  # train_step's arguments after the batch: the frozen base, the distillation base
        if frozen is not None or config.loss.ar_target == "base":
            extra.append(None if frozen is None else step_lib.place_params(jax.device_get(frozen), frozen_shardings))
        if config.loss.ar_target == "base":
            extra.append(step_lib.place_params(jax.device_get(params), shardings.params))
        del params, model

        def position(step: int) -> tuple[int, int]:
            return _position(step, steps_per_epoch, per_step)

        def host_batch(step: int):
            epoch, cursor = position(step)
            rows = distributed.process_rows(mesh_lib.batch_sharding(mesh, 3), (accum, batch_size, 1))
            return data.batch(epoch, cursor, (accum, batch_size), rows)

        log = MetricsLog(run_dir, start, progress=config.log.progress and main, total=total,
                         tensorboard=config.log.tensorboard, enabled=main)
        step_fn, metrics, next_batch = None, {}, host_batch(start) if start < total else None
        with jax.set_mesh(mesh), log:
            for step in range(start, total):
                hb = next_batch
                batch = {k: distributed.global_array(v, mesh_lib.batch_sharding(mesh, v.ndim), hb.global_shapes[k])
                         for k, v in hb.arrays.items()}
                if step_fn is None:
                    step_fn = step_lib.compile_train_step(
                        graphdef, tx, schedule, _step_options(config, spec), mesh, shardings,
                        {k: v.ndim for k, v in hb.arrays.items()}, frozen_shardings)
                t0 = time.perf_counter()
                state, device_metrics = step_fn(state, batch, *extra)
                next_batch = host_batch(step + 1) if step + 1 < total else None  # overlaps the step
                metrics = {k: float(v) for k, v in distributed.to_host(device_metrics).items()}
                elapsed = time.perf_counter() - t0
                epoch = position(step)[0]
                problem = health.unhealthy(metrics, vocab_size)
                if problem:
                    state = None  # frees its memory for the checkpoint reads that name a good one
                    what, figures = problem
                    raise _stopped(f"training {what} at step {step + 1} ({figures})", step + 1, checkpointer,
                                   abstract)
                log.write(step + 1, metrics, epoch=epoch, tokens=hb.tokens, examples=hb.examples,
                          seconds=elapsed, first=(step == start))
                next_epoch, next_cursor = position(step + 1)
                checkpointer.save(step + 1, state, {**fingerprint, "epoch": next_epoch, "cursor": next_cursor,
                                                    "step": step + 1}, force=(step + 1 == total))
                if after_step is not None:
                    after_step(step + 1)
        if config.export and not bool(health.all_finite(state.params)):  # the last update had no next step
            raise _stopped(f"the parameters after the last step {total} are not finite", total + 1,
                           checkpointer, abstract)
    finally:
        checkpointer.close()

    frozen_params = extra[0] if frozen is not None else None
    export_dir = _export(run_dir, graphdef, state, frozen_params, tokenizer, config, main) if config.export else None
    return RunResult(run_dir=run_dir, steps=total, last_metrics=metrics, export_dir=export_dir)


def _position(step: int, steps_per_epoch: int, per_step: int) -> tuple[int, int]:
    """(epoch, cursor) of optimizer step `step` (0-based): where its examples start."""
    return step // steps_per_epoch, (step % steps_per_epoch) * per_step


def _step_options(config: TrainConfig, spec: BatchSpec) -> step_lib.StepOptions:
    return step_lib.StepOptions(loss=config.loss, layout=spec.layout, shared_target=spec.shared_target, remat=config.model.remat,
                                gated=bool(config.adapter.rank and config.adapter.gated),
                                dropout=bool(config.adapter.rank and config.adapter.dropout > 0),
                                objective="placeholder" if config.drafter.placeholders else "consistency",
                                drafter_target=config.drafter.target)


def drafter_data(config: TrainConfig, records: list[TrajectoryRecord]) -> DrafterData:
    d, data = config.drafter, config.data
    return DrafterData(records, DrafterSpec(placeholders=d.placeholders, anchors=d.anchors, decay=d.decay,
                                            target=d.target, max_seq_len=data.max_seq_len,
                                            pad_multiple=data.pad_multiple, seed=data.seed, shuffle=data.shuffle))


def _stopped(what: str, failed_step: int, checkpointer: Checkpointer, abstract) -> TrainingDiverged:
    good, why = health.last_good_checkpoint(checkpointer, abstract, failed_step)
    kept = (f"the last good checkpoint is step {good} in {checkpointer.directory}" if good is not None
            else f"no checkpoint is good ({why})")
    return TrainingDiverged(f"{what}; stopped without exporting, {kept}. Check the data, or lower optim.lr "
                            f"in a new run_dir")


def _write_config(run_dir: Path, config: TrainConfig) -> None:
    """Store the resolved config; an unchanged one is not rewritten (a finished run may be read-only)."""
    path, text = run_dir / "config.yaml", config.to_yaml()
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _exported_step(run_dir: Path) -> int | None:
    """The step of the model in RUN_DIR/export, if one was completely written."""
    try:
        return json.loads((run_dir / "export.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def _export(run_dir: Path, graphdef, state, frozen, tokenizer, config: TrainConfig, main: bool) -> Path:
    """RUN_DIR/export: the model in Hugging Face format, or for an adapter run the adapter in the PEFT
    layout (plus the tokenizer), and on request RUN_DIR/export_merged with the adapter folded in."""
    from cllm_jax.weights.load import export_model
    from cllm_jax.weights.peft import base_model_spec, save_adapter

    params = distributed.to_host(state.params)
    out = run_dir / EXPORT_DIR
    if main:
        states = [jax.tree.map(np.asarray, params)]
        if frozen is not None:
            states.append(jax.tree.map(np.asarray, distributed.to_host(frozen)))
        model = nnx.merge(graphdef, *states)
        model.config = model.config.replace(dtype="float32")
        step = int(jax.device_get(state.step))
        if frozen is None:
            export_model(model, out, tokenizer=tokenizer, overwrite=True)
        else:
            save_adapter(model, out, base_model_spec(config.model.path),
                         extra={"gated": config.adapter.gated, "step": step})
            if tokenizer is not None:
                tokenizer.save(out)
            if config.adapter.export_merged:
                export_model(merge_adapter(model), run_dir / "export_merged", tokenizer=tokenizer, overwrite=True)
        (run_dir / "export.json").write_text(json.dumps({"step": step}) + "\n")
    distributed.sync("export")
    return out
