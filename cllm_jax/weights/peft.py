"""Adapters in the PEFT layout: `adapter_config.json` + `adapter_model.safetensors`, in and out.

Names and shapes are those `peft` writes for a LLaMA or Qwen2 model: per layer i and projection p,
`base_model.model.model.layers.{i}.{self_attn|mlp}.{p}.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]. So `peft.PeftModel.from_pretrained(transformers_model, DIR)` loads ours, and we load
theirs (LoRA without DoRA, bias or rank patterns, which is what we write). Beside them,
`cllm_jax_adapter.json` records what PEFT's config has no field for: whether the adapter was trained
gated (cllm_jax/decode/drafting.py), and the training step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from cllm_jax.errors import CheckpointError
from cllm_jax.model import adapter as adapter_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
EXTRA_FILE = "cllm_jax_adapter.json"
_MODULE = {t: ("self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp") for t in adapter_lib.TARGETS}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def _key(layer: int, target: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.{_MODULE[target]}.{target}.lora_{part}.weight"


def save_adapter(model, path: str | os.PathLike, base_model: str, extra: dict | None = None) -> Path:
    """Write `model.adapter` in the PEFT layout; `base_model` names the base it adapts."""
    adapter = model.adapter
    if adapter is None:
        raise CheckpointError("the model has no adapter to save")
    cfg = adapter.config
    tensors = {}
    for target, (a, b) in adapter.stacked().items():
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        for i in range(a.shape[0]):
            tensors[_key(i, target, "A")] = np.ascontiguousarray(a[i].T)  # [r, in]
            tensors[_key(i, target, "B")] = np.ascontiguousarray(b[i].T)  # [out, r]
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
    (path / EXTRA_FILE).write_text(json.dumps(extra or {}, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")  # last: a dir with it is complete
    return path


def read_adapter_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / CONFIG_FILE} ({e}): is {path} a PEFT adapter directory?") from None
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora") or config.get("bias", "none") != "none":
        raise CheckpointError(f"{path} holds a {config.get('peft_type')} adapter with DoRA or biases: only plain "
                              f"LoRA adapters are supported")
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
    adapter_config = adapter_lib.AdapterConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                                               targets=tuple(targets), dropout=float(config.get("lora_dropout", 0)))
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
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
            getattr(model.adapter, f"{target}_lora_{part.lower()}")[...] = jnp.asarray(stacked)
    return model


def base_model_spec(model_path: str | None) -> str:
    """What an exported adapter names as its base: the training config's model.path as written (a
    built-in name, a path, a hub id), or the built-in default's name."""
    return "smollm2-135m" if model_path is None else str(model_path)
