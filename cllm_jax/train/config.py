"""The training configuration: frozen dataclasses, read from YAML, with `key=value` overrides.

A recipe is a YAML file whose top-level sections mirror `TrainConfig` (model, data, loss, optim,
mesh, distributed, checkpoint, log). Overrides use dotted keys, e.g. `optim.lr=1e-5` or
`data.trajectories=[a,b]`; the value is parsed as YAML, so numbers, booleans, null and lists work.
Unknown keys and wrongly typed values raise ConfigError naming the key. The resolved config is
written to every run directory as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from cllm_jax.decode.options import OptionError, check_value, option
from cllm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    path: str | None = None  # HF directory, .gguf file, or null for the built-in SmolLM2
    dtype: str = option("float32", "compute dtype of matmuls (parameters always stay float32)",
                        choices=("float32", "bfloat16", "float16"))
    # Rematerialization of each decoder layer in the backward pass: none | dots (keep matmul results,
    # recompute the rest) | full (keep only layer inputs); true/false are the old spelling of full/none.
    remat: Any = True  # str or bool: typed Any because the YAML reader takes one type per key
    layer_loop: str = "auto"  # auto | scan | per_layer (cllm_jax/model/llama.py); checkpoints fit both
    attention: str = "xla"  # xla | dot_product (jax.nn.dot_product_attention, cuDNN where it can) | cudnn

    def __post_init__(self):
        from cllm_jax.model.layers import ATTENTION_IMPLEMENTATIONS, remat_policy_name

        if self.layer_loop not in ("auto", "scan", "per_layer"):
            raise ConfigError(f"model.layer_loop={self.layer_loop!r} is not one of auto, scan, per_layer")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            valid = ", ".join(ATTENTION_IMPLEMENTATIONS)
            raise ConfigError(f"model.attention={self.attention!r} is not one of {valid}")
        try:
            remat_policy_name(self.remat)
        except ConfigError:
            raise ConfigError(f"model.remat={self.remat!r} is not one of none, dots, full (or true/false)") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSection:
    trajectories: tuple[str, ...] = ()  # collection directories or .jsonl/.json trajectory files
    layout: str = option("per_record", "per_record (the reference) | packed (Jacobi Forcing style)",
                         choices=("per_record", "packed"))
    ar_source: str = option("teacher", "teacher (prefix + fixed point) | labels (ground truth)",
                            choices=("teacher", "labels"))
    max_seq_len: int = option(1024, "longer inputs lose the oldest prefix tokens (never the block)", at_least=1)
    pad_multiple: int = option(64, "pad lengths up to a multiple of this (fewer recompilations)", at_least=1)
    shuffle: bool = True
    seed: int = 0  # data order and the per-record choice of the trajectory state
    eos_id: int | None = None  # null: the model's; -1: do not mask positions after EOS
    # Which trajectory states train (cllm_jax/train/states.py). Defaults: Jacobi Forcing's, but the
    # clean context; the reference (today's recipe): noise_schedule=uniform, states_per_block=1.
    states_per_block: int = option(1, "noisy states per block in one packed row (each costs n tokens); packed "
                                   "only", at_least=1)
    noise_schedule: str = option("progressive", "uniform (reference) | progressive (JF) | reverse | random",
                                 choices=("uniform", "progressive", "reverse", "random"))
    noise_window: int = option(16, "w: block k aims at noise target k mod w of linspace(noise_min, noise_max, w)",
                               at_least=1)
    noise_min: float = option(0.0, "noise of a state = (n - first mismatch with the fixed point) / n", at_least=0.0,
                              at_most=1.0)
    noise_max: float = option(1.0, "the highest noise target", at_least=0.0, at_most=1.0)
    # packed: clean (reference: a noisy block sees the converged blocks before it) | noisy (JF: it sees
    # the noisy blocks before it). Default clean: what fixed-block and rolling decoding see (noisy
    # context lowered TPF in the ablation, reports/ablation_gsm8k).
    context: str = option("clean", "what a noisy block of a packed row sees", choices=("noisy", "clean"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSection:
    consistency: str = option("global", "global (target on y*) | local (target on the next state)",
                              choices=("global", "local"))
    distance: str = option("forward_kl", "forward_kl (reference soft CE) | reverse_kl | js",
                           choices=("forward_kl", "reverse_kl", "js"))
    ar_weight: float = option(10.0, "the AR term's weight beside the consistency term", at_least=0.0)
    label_smoothing: float = option(0.0, "0: off (Jacobi Forcing); the reference uses 0.1", at_least=0.0, below=1.0)
    # tokens: cross-entropy on the fixed point's tokens (reference, Jacobi Forcing) | base: soft
    # cross-entropy to the frozen base model's distributions there (distillation; one more forward)
    ar_target: str = option("tokens", "tokens | base: the AR term's target", choices=("tokens", "base"))
    # Defaults: Jacobi Forcing's loss; the reference (today's recipe): ar_on_prompt=true,
    # ar_after_eos=true, consistency_norm=tokens, student_eos_pads=true, label_smoothing=0.1.
    ar_on_prompt: bool = False  # AR targets on the prompt too (the reference; ~87% of its AR gradient)
    ar_after_eos: bool = False  # AR targets after the generation's first EOS too (the reference)
    consistency_norm: str = option("blocks", "blocks: per-block mean from first mismatch + 1, then over blocks | "
                                   "tokens", choices=("tokens", "blocks"))
    student_eos_pads: bool = False  # true: a student's tokens after its own EOS leave the loss (reference)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = option(2e-5, "the peak learning rate", at_least=0.0)
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay (norms and biases: none)", at_least=0.0,
                                 at_most=1.0)
    b1: float = option(0.9, "Adam's first-moment decay", at_least=0.0, at_most=0.999999)
    b2: float = option(0.999, "Adam's second-moment decay", at_least=0.0, at_most=0.999999)
    eps: float = option(1e-8, "Adam's epsilon", above=0.0, at_most=1.0)
    schedule: str = option("cosine", "cosine | linear | constant (all after linear warm-up)",
                           choices=("cosine", "linear", "constant"))
    warmup_ratio: float = option(0.03, "the share of steps warming up linearly from 0", at_least=0.0, below=1.0)
    min_lr_ratio: float = option(0.0, "the schedule's last learning rate, as a share of lr", at_least=0.0,
                                 at_most=1.0)
    clip_norm: float = option(1.0, "global gradient norm; 0 disables", at_least=0.0)
    batch_size: int = option(1, "examples per micro-batch, over all processes", at_least=1)
    grad_accum: int = option(1, "micro-batches per optimizer step", at_least=1)
    epochs: int = option(1, "passes over the trajectories", at_least=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps (the schedule follows it; null: the "
                                   "epochs decide)", at_least=1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterSection:
    """A low-rank adapter instead of full fine-tuning (rank 0: off). The base weights stay frozen and
    never enter the optimizer or the checkpoints; the export is the adapter in the PEFT layout."""

    rank: int = option(0, "the adapter's rank (0: full fine-tuning)", at_least=0, at_most=4096)
    alpha: float = 32.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    # true: the adapter acts only on the noisy blocks of a packed row, which read the base model's
    # view of the prompt and clean blocks: the drafter of the gated decoding layout (decode/drafting.py)
    gated: bool = False
    export_merged: bool = False  # also write RUN_DIR/export_merged: the base with the adapter folded in


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrafterSection:
    """The placeholder drafter's objective instead of the consistency objective (placeholders > 0; needs
    an adapter): at random anchors of the base model's own text, k placeholders predict the k tokens
    after the next one (cllm_jax/train/drafter.py). It reads only the generated text of the records."""

    placeholders: int = 0  # k: placeholder embeddings learned (and drafts per pass); 0: the consistency objective
    anchors: int = 32  # anchor positions drawn per sequence (each with its k placeholders), fewer if shorter
    decay: float = 0.8  # the loss weight of draft position j (0-based) is decay^j: acceptance is decided early
    target: str = "tokens"  # tokens: cross-entropy on the base's text | base: KL to the base's distributions


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshSection:
    data: int = -1  # one axis may be -1: all devices the other two leave
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSection:
    enabled: bool = False  # call jax.distributed.initialize before anything touches devices
    coordinator: str | None = None  # host:port; null lets JAX detect the cluster (SLURM, TPU, ...)
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = option(200, "optimizer steps between checkpoints (the last step is always saved)", at_least=1)
    keep: int = option(2, "checkpoints kept", at_least=1)
    asynchronous: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogSection:
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # when tensorboardX or torch.utils.tensorboard is importable


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0  # the train state's JAX RNG
    export: bool = True  # write RUN_DIR/export (Hugging Face format) at the end
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    loss: LossSection = LossSection()
    optim: OptimSection = OptimSection()
    adapter: AdapterSection = AdapterSection()
    drafter: DrafterSection = DrafterSection()
    mesh: MeshSection = MeshSection()
    distributed: DistributedSection = DistributedSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()

    def __post_init__(self):
        for section in dataclasses.fields(self):  # every key against the range declared beside it
            values = getattr(self, section.name)
            for field in dataclasses.fields(values) if dataclasses.is_dataclass(values) else ():
                try:
                    check_value(field.name, getattr(values, field.name), dict(field.metadata))
                except OptionError as error:
                    raise ConfigError(f"{section.name}.{error.name} {error.problem}") from None
        if self.data.layout == "per_record" and self.data.states_per_block != 1:
            raise ConfigError(f"data.states_per_block={self.data.states_per_block} needs data.layout=packed "
                              f"(a per-record row holds one state)")
        if self.data.layout == "packed" and self.data.context == "noisy" and self.loss.consistency == "local":
            raise ConfigError("data.context=noisy needs loss.consistency=global (a local target state "
                              "has no noisy context of its own); use data.context=clean")
        if self.data.noise_min > self.data.noise_max:
            raise ConfigError(f"data.noise_min={self.data.noise_min} is above data.noise_max={self.data.noise_max}")
        if self.adapter.rank:
            self._check_adapter()
        else:  # without an adapter its other keys would be ignored: a run that is not the one asked for
            default = AdapterSection()
            for field in dataclasses.fields(AdapterSection):
                if getattr(self.adapter, field.name) != getattr(default, field.name):
                    raise ConfigError(f"adapter.{field.name} is set but adapter.rank is 0 (full fine-tuning, no "
                                      f"adapter): set adapter.rank (e.g. 16) or drop adapter.{field.name}")
        self._check_drafter()

    def _check_drafter(self):
        d = self.drafter
        if d.placeholders < 0 or d.anchors < 1 or not 0 < d.decay <= 1 or d.target not in ("tokens", "base"):
            raise ConfigError(f"drafter needs placeholders >= 0, anchors >= 1, decay in (0, 1] and target tokens|base, "
                              f"got {d}")
        if d.placeholders and not self.adapter.rank:
            raise ConfigError("drafter.placeholders trains a placeholder drafter, which is an adapter: set adapter.rank "
                              "(e.g. adapter.rank=16)")
        if d.placeholders and self.adapter.dropout:
            raise ConfigError("drafter.placeholders trains without adapter dropout: set adapter.dropout=0")
        if d.placeholders and self.adapter.gated:
            raise ConfigError("drafter.placeholders gates the adapter on its placeholders already: drop adapter.gated")

    def _check_adapter(self):
        from cllm_jax.model.adapter import AdapterConfig

        a = self.adapter
        AdapterConfig(rank=a.rank, alpha=a.alpha, targets=a.targets, dropout=a.dropout)  # checks the values
        if self.loss.ar_target == "base":
            raise ConfigError("loss.ar_target=base distils the base model, which an adapter run keeps frozen "
                              "already: use loss.ar_target=tokens with train.adapter")
        if a.gated and (self.data.layout, self.loss.consistency, self.data.context, self.data.ar_source) != (
                "packed", "global", "clean", "teacher"):
            raise ConfigError("adapter.gated needs data.layout=packed, loss.consistency=global, data.context=clean "
                              "and data.ar_source=teacher (the adapter acts on the noisy blocks alone)")

    def adapter_config(self):
        """The model's AdapterConfig, or None for full fine-tuning."""
        from cllm_jax.model.adapter import AdapterConfig

        a = self.adapter
        return (AdapterConfig(rank=a.rank, alpha=a.alpha, targets=a.targets, dropout=a.dropout,
                              placeholders=self.drafter.placeholders) if a.rank else None)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _convert(value, options[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key or 'the config'} must be a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(items))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "2e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (type(value) is hint):
        raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise unknown_key(unknown[0], names, prefix)
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


def unknown_key(key: str, valid, section: str = "") -> ConfigError:
    """The one-line error for an unknown key: the valid ones, and the closest as a suggestion."""
    import difflib

    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"did you mean {section + '.' if section else ''}{close[0]}? " if close else ""
    where = f"section '{section}'" if section else "the config"
    return ConfigError(f"unknown key {section + '.' if section else ''}{key} in {where}: {hint}"
                       f"(valid: {', '.join(sorted(valid))})")


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """A copy of `values` with each `dotted.key=value` applied (value parsed as YAML)."""
    values = _plain(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e.problem})") from None
        node = values
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return values


def config_from_dict(values: dict) -> TrainConfig:
    return _build(TrainConfig, values or {})


def read_yaml(path: str | Path, kind: str = "config", sections: str = "") -> dict:
    """The mapping of sections a YAML file holds (empty: none); whatever is wrong with the file is one
    line naming it. `kind` names the file in that line, `sections` what a mapping should hold."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read {kind} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections" + (f" ({sections})" if sections else ""))
    return values


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """The TrainConfig of a YAML recipe (None: defaults) with `key=value` overrides applied."""
    values = {} if path is None else read_yaml(path)
    return config_from_dict(apply_overrides(values, list(overrides)))
