"""--model org/name[@revision] from a Hugging Face hub cache, and PyTorch .bin checkpoints.

The cache is laid out by hand in a temporary directory exactly as huggingface_hub writes it
(models--org--name/refs/<branch> holding a commit hash, snapshots/<hash>/<files>), with
HF_HUB_OFFLINE=1: nothing may reach the network.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cllm_jax.errors import CheckpointError
from cllm_jax.weights.load import load_model
from tests.tiny import torch_model

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
IDS = [[1, 5, 9, 17, 33, 4, 2, 8]]


def our_logits(loaded):
    ids = np.array(IDS, np.int32)
    hidden, _ = loaded.model(ids, np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    return np.asarray(loaded.model.logits(hidden))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = torch_model("llama", num_key_value_heads=2)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path, max_shard_size="100KB")  # sharded safetensors through the hub too
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


@pytest.fixture
def hub_cache(tmp_path, tiny, monkeypatch):
    """A hub cache holding org/tiny at branch main and at the tag v1 (same commit)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    shutil.copytree(tiny[0], repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    for ref in ("main", "v1"):
        (repo / "refs" / ref).write_text(COMMIT)
    from huggingface_hub import constants

    # huggingface_hub reads these environment variables at import; set both for this process and children.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_and_loads_like_the_directory(hub_cache, tiny):
    path, reference = tiny
    direct = load_model(path)
    for name in ("org/tiny", "org/tiny@main", "org/tiny@v1", f"org/tiny@{COMMIT}"):
        loaded = load_model(name)
        assert loaded.path == hub_cache / "models--org--tiny" / "snapshots" / COMMIT
        np.testing.assert_array_equal(our_logits(loaded), our_logits(direct))
    np.testing.assert_allclose(our_logits(load_model("org/tiny")), torch_logits(reference), atol=1e-4)


def test_missing_hub_id_is_one_line_naming_the_download(hub_cache, tiny):
    with pytest.raises(CheckpointError, match=r"org/other is neither a local path nor a model in the Hugging "
                                              rf"Face cache \({hub_cache}\): download it once with `hf download org/other`"):
        load_model("org/other")
    with pytest.raises(CheckpointError, match="`hf download org/tiny --revision v2`"):
        load_model("org/tiny@v2")
    out = subprocess.run([sys.executable, str(ROOT / "decode.py"), "--model", "org/other", "--prompt-ids", "1"],
                         capture_output=True, text=True, env=os.environ.copy())  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "hf download org/other" in out.stderr, out.stderr
    assert str(hub_cache) in out.stderr


def test_hub_id_in_a_config(hub_cache, tiny):
    from cllm_jax.train.config import load_config  # the `model:` key reaches the same loader

    config = load_config(ROOT / "configs" / "smollm2_cpu.yaml", ["model.path=org/tiny"])
    np.testing.assert_array_equal(our_logits(load_model(config.model.path)), our_logits(load_model(tiny[0])))


@pytest.mark.parametrize("sharded", [False, True])
def test_pytorch_bin_checkpoint(tmp_path, tiny, sharded):
    _, reference = tiny
    state = reference.state_dict()
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    if sharded:
        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}  # fmt: skip
        for file, keys in halves.items():
            torch.save({k: state[k] for k in keys}, path / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, path / "pytorch_model.bin")
    np.testing.assert_allclose(our_logits(load_model(path)), torch_logits(reference), atol=1e-4)


def test_pytorch_bin_without_torch_is_one_line(tmp_path, tiny, monkeypatch):
    import importlib.util

    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(tiny[1].config.to_dict()))
    torch.save(tiny[1].state_dict(), path / "pytorch_model.bin")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(CheckpointError, match="need torch to read: `pip install torch`"):
        load_model(path)
