"""A file split into parts and joined back, checked by SHA-256 (scripts/gpu_transfer.py's transfer)."""

import hashlib
import json
import os

import pytest

from cllm_jax.errors import CheckpointError
from cllm_jax.weights.parts import join_parts, split_file


@pytest.fixture
def original(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(10_000))
    return path


def test_split_then_join_gives_the_same_bytes(original, tmp_path):
    manifest = split_file(original, tmp_path / "parts", 3000)
    spec = json.loads(manifest.read_text())
    assert [p["size"] for p in spec["parts"]] == [3000, 3000, 3000, 1000]
    assert spec["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()
    out = join_parts(manifest, tmp_path / "there" / "model.gguf")
    assert out.read_bytes() == original.read_bytes()
    assert join_parts(manifest, out) == out  # already in place: kept


def test_a_damaged_or_missing_part_is_named_and_nothing_is_written(original, tmp_path):
    manifest = split_file(original, tmp_path / "parts", 4096)
    part = tmp_path / "parts" / "model.gguf.part01"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    out = tmp_path / "there" / "model.gguf"
    with pytest.raises(CheckpointError, match="part01"):
        join_parts(manifest, out)
    part.unlink()
    with pytest.raises(CheckpointError, match="missing.*part01"):
        join_parts(manifest, out)
    assert not out.exists()


def test_a_wrong_file_in_place_is_replaced(original, tmp_path):
    manifest = split_file(original, tmp_path / "parts", 4096)
    out = tmp_path / "model.gguf"
    out.write_bytes(b"stale")
    assert join_parts(manifest, out).read_bytes() == original.read_bytes()
