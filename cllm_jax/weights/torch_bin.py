"""PyTorch `pytorch_model*.bin` checkpoints (single or sharded), read with torch when it is installed.

Older Hugging Face checkpoints, the CLLM paper's released LLaMA models among them, ship only these
pickled state dicts. They are loaded with `weights_only=True`: plain tensors, no arbitrary code.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from cllm_jax.errors import CheckpointError

WEIGHTS_FILE = "pytorch_model.bin"
INDEX_FILE = "pytorch_model.bin.index.json"


def has_torch_weights(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file()


def read_torch_weights(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the .bin checkpoint in `path`, floats as float32 numpy arrays (torch layout)."""
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(f"{path} holds PyTorch .bin weights, which need torch to read: `pip install torch` "
                              f"(the CPU build is enough), or convert the model to safetensors")
    import torch

    files = [path / WEIGHTS_FILE]
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot parse {path / INDEX_FILE} ({e}): fix or re-download the checkpoint") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated download, a pickle that is not a state dict
            raise CheckpointError(f"cannot read {file} ({type(e).__name__}: {str(e)[:120]}): re-download it") from None
        for name, tensor in state.items():
            tensor = tensor.float() if tensor.is_floating_point() else tensor
            tensors[name] = tensor.numpy()
    return tensors
