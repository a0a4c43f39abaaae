"""One entry point from a --model argument to a ready model, and the way back out to Hugging Face."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cllm_jax.config import ModelConfig
from cllm_jax.model.llama import Llama
from cllm_jax.tokenizer import Tokenizer
from cllm_jax.weights.convert import hf_tensors_from_model, model_from_hf_tensors
from cllm_jax.weights.default_model import resolve_model_path
from cllm_jax.weights.hf_dir import read_hf_dir, write_hf_dir

RUN_EXPORT_DIR = "export"  # where train.py writes a run's final model inside its run directory


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer | None  # None for checkpoints saved without tokenizer files
    config: ModelConfig
    path: Path


def load_model(arg: str | os.PathLike | None = None, dtype: str = "float32") -> LoadedModel:
    """Load a Hugging Face directory, a .gguf file, a training run directory, or (None) the default model."""
    if arg is not None and (Path(arg) / RUN_EXPORT_DIR / "config.json").is_file():
        arg = Path(arg) / RUN_EXPORT_DIR
    path = resolve_model_path(arg)
    hf_config, tensors = read_hf_dir(path)
    config = ModelConfig.from_hf(hf_config, dtype=dtype)
    model = model_from_hf_tensors(config, tensors)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model, tokenizer, config, path)


def export_model(model: Llama, path: str | os.PathLike, tokenizer: Tokenizer | None = None, overwrite=False) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM.from_pretrained loads as is."""
    write_hf_dir(path, model.config.to_hf(), hf_tensors_from_model(model), tokenizer=tokenizer, overwrite=overwrite)
    return Path(path)
