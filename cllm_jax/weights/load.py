"""One entry point from a --model argument to a ready model, and the way back out to Hugging Face."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cllm_jax.config import ModelConfig
from cllm_jax.errors import CheckpointError
from cllm_jax.model.llama import Llama, cast_matrices, resolve_layer_loop
from cllm_jax.tokenizer import Tokenizer
from cllm_jax.weights.builtin import builtin_model_dir
from cllm_jax.weights.convert import hf_tensors_from_model, model_from_hf_tensors
from cllm_jax.weights.drafters import shipped_drafter, shipped_names
from cllm_jax.weights.default_model import resolve_model_path
from cllm_jax.weights.hf_dir import INDEX_FILE, WEIGHTS_FILE, read_hf_config, read_hf_dir, write_hf_dir
from cllm_jax.weights.hub import parse_hub_id, resolve_hub_id
from cllm_jax.weights.peft import is_adapter_dir, load_adapter, read_adapter_config
from cllm_jax.weights.torch_bin import has_torch_weights, read_torch_weights

RUN_EXPORT_DIR = "export"  # where train.py writes a run's final model inside its run directory


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedModel:
    model: Llama
    tokenizer: Tokenizer | None  # None for checkpoints saved without tokenizer files
    config: ModelConfig
    path: Path  # the base model's directory when the model carries an adapter
    adapter: Path | None = None  # the PEFT adapter directory the model carries (cllm_jax/weights/peft.py)


def load_model(arg: str | os.PathLike | None = None, dtype: str = "float32", layer_loop: str = "auto",
               stacked: bool | None = None, weights_dtype: str | None = None) -> LoadedModel:
    """Load a Hugging Face directory, a .gguf file, a training run directory, or (None) the default model.

    layer_loop: auto | scan | per_layer (see cllm_jax.model.llama; auto depends on the backend and
    the model size). stacked: the weight storage; default per-layer arrays for the per_layer loop
    (the fast decoding layout), stacked for scan. Training passes stacked=True: its states and
    checkpoints always hold the canonical stacked layout, whichever loop runs. weights_dtype: store
    the weight matrices in it (decoding in bf16: pass dtype, same outputs, half the bytes read per
    step; cllm_jax.model.llama.cast_matrices); default float32.

    An adapter directory (a PEFT adapter, or the export of a training run with train.adapter) loads
    its base model (the adapter's base_model_name_or_path) with the adapter attached.
    """
    path = resolve_model(arg)
    if is_adapter_dir(path) and not (path / "config.json").is_file():
        base = read_adapter_config(path).get("base_model_name_or_path")
        loaded = load_model(base, dtype, layer_loop, stacked, weights_dtype)
        load_adapter(loaded.model, path)
        return dataclasses.replace(loaded, adapter=path)
    hf_config, tensors = _read_checkpoint(path)
    config = ModelConfig.from_hf(hf_config, dtype=dtype)
    # stacked storage is training's layout, which auto runs with the scan (per_layer pays off only with
    # per-layer arrays, the decoding layout)
    config = config.replace(layer_loop=resolve_layer_loop(layer_loop, config, training=bool(stacked)))
    model = model_from_hf_tensors(config, tensors, stacked=stacked)
    if weights_dtype not in (None, "float32"):
        cast_matrices(model, weights_dtype)
    tokenizer = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, path=path)


def resolve_model(arg: str | os.PathLike | None) -> Path:
    """The Hugging Face directory a --model argument (or a config's `model:`) names.

    None: the built-in default. A built-in name (cllm_jax.weights.builtin.BUILTIN_MODELS:
    smollm2-135m, qwen2.5-coder-0.5b), checked first. An existing path: a model directory, a .gguf
    file, a training run (its export), or a pipeline run (its train/ run's export). Otherwise
    `org/name[@revision]`: a model in the Hugging Face cache.
    """
    if arg is None:
        return resolve_model_path(None)
    builtin = builtin_model_dir(str(arg))
    if builtin is not None:
        return builtin
    path = Path(arg).expanduser()
    if not path.exists() and parse_hub_id(str(arg)) is not None:
        return resolve_hub_id(*parse_hub_id(str(arg)))
    export = _run_export(path)
    if export is not None:
        return export
    if is_adapter_dir(path):
        return path
    return resolve_model_path(path)


def resolve_adapter(arg: str | os.PathLike) -> Path:
    """The PEFT adapter directory an adapter argument names: a shipped drafter's name
    (weights/drafters.py), the directory itself, or a training (or pipeline) run that trained one. A
    path that is none of these is returned as is, for the loader to say what it lacks."""
    if str(arg) in shipped_names() and not Path(arg).exists():
        return shipped_drafter(str(arg))
    path = Path(arg).expanduser()
    export = None if is_adapter_dir(path) else _run_export(path)
    if export is None or is_adapter_dir(export):
        return path if export is None else export
    raise CheckpointError(f"{arg} trained the whole model, not an adapter (its export {export} is a full model): "
                          f"decode it as the model itself, or pass an adapter run")


def _run_export(path: Path) -> Path | None:
    """A finished run's export directory; None if `path` is no run. An unfinished run is refused."""
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    for run in (path / "train", path):  # a pipeline run (it trains in train/), or a training run
        if any((run / name).exists() for name in (RUN_EXPORT_DIR, "checkpoints", "config.yaml")):
            export = run / RUN_EXPORT_DIR
            if (export / "config.json").is_file() or is_adapter_dir(export):
                return export
            raise CheckpointError(
                f"{run} is a training run with no exported model yet ({run / RUN_EXPORT_DIR} is missing): "
                f"training has not finished; rerun the same train.py command to finish and export it, or "
                f"pass a finished run or a model directory"
            )
    return None


def _read_checkpoint(path: Path) -> tuple[dict, dict]:
    """config.json and the tensors: safetensors (single or sharded), else pytorch_model*.bin."""
    if has_torch_weights(path) and not ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()):
        return read_hf_config(path), read_torch_weights(path)
    return read_hf_dir(path)


def export_model(model: Llama, path: str | os.PathLike, tokenizer: Tokenizer | None = None, overwrite=False) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM.from_pretrained loads as is."""
    write_hf_dir(path, model.config.to_hf(), hf_tensors_from_model(model), tokenizer=tokenizer, overwrite=overwrite)
    return Path(path)
