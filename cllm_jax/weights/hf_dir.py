"""Read and write Hugging Face checkpoint directories with numpy only.

Weights cross this boundary as {Hugging Face tensor name: numpy array} in the torch layout
([out, in] for linear weights) plus the `config.json` dict.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import ml_dtypes  # noqa: F401 -- registers np.dtype("bfloat16"), which safetensors.numpy needs
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from cllm_jax.errors import CheckpointError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_NO_CONFIG_HINT = "pass a Hugging Face model directory, a .gguf file, or omit --model for the built-in default"


def read_hf_config(path: str | os.PathLike) -> dict:
    """The `config.json` of a Hugging Face model directory, as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: {_NO_CONFIG_HINT}")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"no {CONFIG_FILE} in {path}: {_NO_CONFIG_HINT}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot parse {config_file} ({e}): fix or re-export the checkpoint") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object: fix or re-export the checkpoint")
    return config


def _weight_files(path: Path) -> tuple[list[Path], set[str] | None]:
    """The safetensors files to read, and the tensor names the index promises (None without an index)."""
    index_file = path / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot parse {index_file} ({e}): fix or re-export the checkpoint") from e
        return [path / name for name in sorted(set(weight_map.values()))], set(weight_map)
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE], None
    raise CheckpointError(
        f"no {WEIGHTS_FILE} or {INDEX_FILE} in {path}: only safetensors checkpoints are supported "
        "(re-save the model with save_pretrained(..., safe_serialization=True))"
    )


def _as_float32(array: np.ndarray) -> np.ndarray:
    # bf16 ("V" kind via ml_dtypes) and fp16/fp64 are upcast; integer buffers keep their type.
    if array.dtype.kind in "fV":
        return array.astype(np.float32, copy=False)
    return array


def read_hf_dir(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """The config dict and every tensor (floats upcast to float32) of a Hugging Face checkpoint dir."""
    path = Path(path)
    config = read_hf_config(path)
    files, expected = _weight_files(path)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"missing shard {file} listed in {INDEX_FILE}: copy the complete checkpoint")
        try:
            # One tensor at a time, so a bf16 checkpoint never sits in memory twice at full size.
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    tensors[name] = _as_float32(f.get_tensor(name))
        except (SafetensorError, OSError, TypeError) as e:
            raise CheckpointError(f"cannot read {file} ({e}): the file is corrupt; re-download or re-export it") from e
    if expected is not None and expected - tensors.keys():
        missing = sorted(expected - tensors.keys())
        raise CheckpointError(f"{len(missing)} tensors listed in {path / INDEX_FILE} are missing, e.g. {missing[0]}")
    return config, tensors


def _complete_config(hf_config: dict, dtype: str) -> dict:
    """The config fields transformers needs to load what we wrote."""
    config = dict(hf_config)
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError("hf_config has no 'model_type': transformers cannot load the directory without it")
    if not config.get("architectures") and model_type in ARCHITECTURES:
        config["architectures"] = [ARCHITECTURES[model_type]]
    # transformers 5 loads with dtype="auto" by default, i.e. in the dtype named here: it must be
    # the dtype stored on disk, or a float32 export silently loads as bf16. `torch_dtype` is its
    # old name; drop it so the two can never disagree.
    config.pop("torch_dtype", None)
    config["dtype"] = dtype
    return config


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _write_weights(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    shards = _shards(tensors, max_shard_bytes)
    # transformers rejects safetensors files whose metadata does not name a known format.
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_FILE), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _write_json(file: Path, data: dict) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_hf_dir(
    path: str | os.PathLike,
    hf_config: dict,
    tensors: dict[str, np.ndarray],
    tokenizer=None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint directory that transformers' `from_pretrained` loads.

    Everything goes into a temporary directory next to `path` that is renamed into place at the
    end, so an interrupted export never leaves a half-written `path`. `tokenizer` is anything with
    `save(dir)` (our Tokenizer) or `save_pretrained(dir)` (a transformers tokenizer).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} already exists: choose a new output directory or pass overwrite=True")
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}  # safetensors needs C order
    if hf_config.get("tie_word_embeddings") and "model.embed_tokens.weight" in arrays:
        arrays.pop("lm_head.weight", None)  # transformers re-ties it to the embedding on load
    float_dtypes = {a.dtype.name for a in arrays.values() if a.dtype.kind in "fV"}
    if len(float_dtypes) > 1:
        raise CheckpointError(f"tensors mix float dtypes {sorted(float_dtypes)}: cast them to one dtype first")
    config = _complete_config(hf_config, float_dtypes.pop() if float_dtypes else "float32")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_weights(tmp, arrays, max_shard_bytes)
        _write_json(tmp / CONFIG_FILE, config)
        special_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: config[k] for k in special_ids if config.get(k) is not None}
        _write_json(tmp / GENERATION_CONFIG_FILE, generation)
        if tokenizer is not None:
            save = getattr(tokenizer, "save_pretrained", None) or tokenizer.save
            save(str(tmp))
        # mkdtemp and safetensors' own temp files are owner-only; make the checkpoint readable like any other.
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            if file.is_file():
                os.chmod(file, 0o644)
        if path.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
