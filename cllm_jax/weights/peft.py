"""Adapters in the PEFT layout: `adapter_config.json` + `adapter_model.safetensors`, in and out.

Names and shapes are those `peft` writes for a LLaMA or Qwen2 model: per layer i and projection p,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{p}.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]. So `peft.PeftModel.from_pretrained(transformers_model, DIR)` loads ours, and we load
theirs (LoRA without DoRA, bias or rank patterns, which is what we write). Beside them,
`cllm_jax_adapter.json` records what PEFT's config has no field for: whether the adapter was trained
gated (cllm_jax/decode/drafting.py), the training step, and for a placeholder drafter the number of
its placeholders, whose embeddings [k, hidden] are `placeholder_embeddings.safetensors` (PEFT loads
the LoRA part alone; our loader the whole drafter).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from cllm_jax.errors import CheckpointError
from cllm_jax.model import adapter as adapter_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "cllm_jax_adapter.json"
PLACEHOLDERS_FILE = "placeholder_embeddings.safetensors"
_MODULE = {t: ("self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for t in adapter_lib.TARGETS}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _key(layer: int, target: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_MODULE[target]}.{target}.lora_{part}.weight"


def save_adapter(model, path: str | os.PathLike, base_model: str, extra: dict | None = None,
                 dtype: str = "float32") -> Path:
    """Write `model.adapter` in the PEFT layout; `base_model` names the base it adapts. `dtype`
    float32 or bfloat16 (half the bytes, for drafters shipped in the repository)."""
    adapter = model.adapter
    if adapter is None:
        raise CheckpointError("the model has no adapter to save")
    cfg = adapter.config
    tensors = {}
    store = _storage_dtype(dtype)
    for target, (a, b) in adapter.stacked().items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for i in range(a.shape[0]):
            tensors[_key(i, target, "A")] = np.ascontiguousarray(a[i].T).astype(store)  # [r, in]
            tensors[_key(i, target, "B")] = np.ascontiguousarray(b[i].T).astype(store)  # [out, r]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    extra = dict(extra or {})
    if adapter.placeholders is not None:
        embeddings = np.asarray(adapter.placeholders[...], np.float32).astype(store)
        save_file({"placeholders": embeddings}, str(path / PLACEHOLDERS_FILE), metadata={"format": "pt"})
        extra["placeholders"] = int(embeddings.shape[0])
    (path / EXTRA_FILE).write_text(json.dumps(extra, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")  # last: a dir with it is complete
    return path


def _storage_dtype(dtype: str):
    import ml_dtypes  # numpy's bfloat16 (a JAX dependency); safetensors stores it as BF16

    if dtype not in ("float32", "bfloat16"):
        raise CheckpointError(f"adapters are saved as float32 or bfloat16, not {dtype!r}")
    return np.float32 if dtype == "float32" else ml_dtypes.bfloat16


# PEFT keys that change what the tensors compute; loading past one would run a different adapter
# than the one trained, so each is refused by name unless it holds PEFT's default
_UNSUPPORTED = {"use_rslora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}, "use_dora": False, "bias": "none", "modules_to_save": None}


def read_adapter_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {file} ({e}): is {path} a PEFT adapter directory?") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a {type(config).__name__}, not an adapter config (a JSON object)")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path} holds a {config.get('peft_type')} adapter: only LoRA adapters are supported")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None):
            raise CheckpointError(f"{file} sets {key}={config[key]!r}, which this loader does not support: only plain "
                                  f"LoRA adapters on every layer are")
    for key, kind in (("r", int), ("lora_alpha", (int, float))):
        if key not in config:
            raise CheckpointError(f"{file} has no {key!r}: the adapter config is incomplete")
        if isinstance(config[key], bool) or not isinstance(config[key], kind) or config[key] <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive number{' (whole)' if kind is int else ''}, "
                                  f"got {config[key]!r}")
    return config


def read_extra(path: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(path) / EXTRA_FILE).read_text())
    except (OSError, ValueError):
        return {}  # an adapter written by peft itself


def load_adapter(model, path: str | os.PathLike):
    """Attach the PEFT adapter in `path` to `model` (in place); returns the model."""
    path = Path(path)
    config = read_adapter_config(path)
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        raise CheckpointError(f"{path}: target_modules is a pattern ({targets!r}); name the projections instead")
    placeholders = int(read_extra(path).get("placeholders", 0))
    adapter_config = adapter_lib.AdapterConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                                               targets=tuple(targets), dropout=float(config.get("lora_dropout", 0)),
                                               placeholders=placeholders)
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {path / WEIGHTS_FILE} ({e}): the adapter is incomplete or damaged") from None
    tensors = {k if k.startswith("base_model.model.") else f"base_model.model.{k}": v for k, v in tensors.items()}
    tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}  # peft's in-memory names
    adapter_lib.attach(model, adapter_config)
    layers = model.config.num_layers
    for target in adapter_config.targets:
        fan_in, fan_out = adapter_lib.projection_shape(model.config, target)
        for part, shape in (("A", (adapter_config.rank, fan_in)), ("B", (fan_out, adapter_config.rank))):
            names = [_key(i, target, part) for i in range(layers)]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise CheckpointError(f"{path} has no tensor {missing[0]}: the adapter does not fit this model")
            bad = [n for n in names if tensors[n].shape != shape]
            if bad:
                raise CheckpointError(f"{path}: {bad[0]} has shape {tensors[bad[0]].shape}, this model needs {shape}")
            stacked = np.stack([tensors[n].T for n in names]).astype(np.float32)
            if not np.isfinite(stacked).all():  # no training leaves one: it is damage, named where it is found
                bad = next(n for n in names if not np.isfinite(tensors[n].astype(np.float32)).all())
                raise CheckpointError(f"{path / WEIGHTS_FILE}: tensor {bad} holds NaN or infinite values: the adapter "
                                      f"is damaged (retrain it, or export an earlier checkpoint)")
            getattr(model.adapter, f"{target}_lora_{part.lower()}")[...] = jnp.asarray(stacked)
    if placeholders:
        embeddings = _read_placeholders(path, (placeholders, model.config.hidden_size))
        model.adapter.placeholders[...] = jnp.asarray(embeddings)
    return model


def _read_placeholders(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        embeddings = load_file(str(path / PLACEHOLDERS_FILE))["placeholders"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read the placeholder embeddings {path / PLACEHOLDERS_FILE} ({e}): the "
                              f"drafter is incomplete or damaged") from None
    if embeddings.shape != shape:
        raise CheckpointError(f"{path / PLACEHOLDERS_FILE} holds embeddings of shape {embeddings.shape}, this model "
                              f"needs {shape}")
    embeddings = embeddings.astype(np.float32)
    if not np.isfinite(embeddings).all():  # as for the LoRA tensors: no training leaves one, it is damage
        raise CheckpointError(f"{path / PLACEHOLDERS_FILE}: tensor placeholders holds NaN or infinite values: the "
                              f"drafter is damaged; retrain or restore it")
    return embeddings


def base_model_spec(model_path: str | None) -> str:
    """What an exported adapter names as its base: the training config's model.path as written (a
    built-in name, a path, a hub id), or the built-in default's name."""
    return "smollm2-135m" if model_path is None else str(model_path)
