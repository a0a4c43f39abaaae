"""Decoding on a device mesh equals decoding on one device (8 simulated CPU devices).

The device count is fixed when JAX starts and the rest of the suite runs on one device, so the JAX
work runs in subprocesses started with JAX_NUM_CPU_DEVICES=8: this file run as a script, one group
of cases per process (a few compilations each), printing one JSON line. Every mesh run is compared
with a single-device run of the same model, prompts and options in the same process.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 12
# Greedy decoding of the tiny model below makes this token early in the first prompt's text: with it as
# EOS a row ends early (the greedy cases check that one did).
EOS = 72

# (mesh, batch, sampled): every mesh, both batch sizes and both token rules for each method, with EOS.
CASES = [((8, 1), 8, False), ((1, 8), 1, True), ((2, 4), 8, True)]
METHODS = {
    "ar": ("ar", {}),
    "jacobi": ("jacobi", {"block_size": 4}),
    "jacobi-rolling": ("jacobi-rolling", {"block_size": 4}),
    "jacobi-multiblock": ("jacobi-multiblock", {"block_size": 4, "blocks": 2}),
    "lossless-rows": ("jacobi-lossless", {"block_size": 4, "layout": "rows"}),
    "lossless-gated": ("jacobi-lossless", {"block_size": 4, "layout": "gated", "blocks": 2}),
    "lossless-placeholder": ("lossless-placeholder", {"drafts": 3}),
}


def tiny_model(heads=4, kv_heads=2, head_dim=16, adapter=False, placeholders=0, layer_loop="scan"):
    """A tiny random LLaMA; weights 10x the default init, so argmax decisions are clear-cut."""
    import jax
    from flax import nnx

    from cllm_jax.config import ModelConfig
    from cllm_jax.model import adapter as adapter_lib
    from cllm_jax.model.llama import Llama

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=heads,
                         num_kv_heads=kv_heads, head_dim=head_dim, eos_token_id=2, max_position_embeddings=256,
                         layer_loop=layer_loop)
    model = Llama(config, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda x: x * 10, nnx.state(model)))
    if adapter or placeholders:
        adapter_config = adapter_lib.AdapterConfig(rank=4, alpha=8.0, placeholders=placeholders)
        adapter_lib.attach(model, adapter_config, seed=1)
        for i, target in enumerate(adapter_config.targets):  # a nonzero B: the drafts differ from the base's
            b = getattr(model.adapter, f"{target}_lora_b")
            b[...] = 0.3 * jax.random.normal(jax.random.key(1 + i), b[...].shape)
    return model


def prompts(n=8):
    import numpy as np

    rs = np.random.RandomState(3)
    out = [rs.randint(3, 128, 3 + 2 * i).tolist() for i in range(n)]
    out[-1] = [7, 8, 9, 10] * 3  # a repeating prompt: lookup guesses find matches
    return out


def decode(model, method, options, batch, sampled, mesh):
    from cllm_jax.decode.engine import Decoder
    from cllm_jax.decode.sampling import Sampling

    sampling = Sampling(temperature=0.8, top_k=20, seed=5) if sampled else Sampling()
    decoder = Decoder(model, method, batch_size=batch, mesh=mesh, max_new_tokens=MAX_NEW, eos_id=EOS,
                      sampling=sampling, **options)
    return [{"tokens": r.token_ids, "passes": r.forward_passes, "blocks": r.blocks, "ff": r.fast_forwarded,
             "stationary": r.stationary, "acceptance": r.acceptance} for r in decoder.generate(prompts(batch))]


def case_name(mesh_shape, batch, sampled) -> str:
    return f"{'x'.join(map(str, mesh_shape))}-b{batch}-{'sampled' if sampled else 'greedy'}"


def method_worker(group: str, case: str) -> dict:
    from cllm_jax.parallel import decode_mesh

    per_layer = group.endswith("per-layer")  # per-layer weight and cache arrays (the accelerator layout)
    method, options = METHODS[group.removesuffix("-per-layer")]
    kind = {"adapter": method == "jacobi-lossless", "placeholders": 4 if method == "lossless-placeholder" else 0,
            "layer_loop": "per_layer" if per_layer else "scan"}
    (mesh_shape, batch, sampled), = [c for c in CASES if case_name(*c) == case]
    mesh = decode_mesh.make_decode_mesh(*mesh_shape)
    return {"one": decode(tiny_model(**kind), method, options, batch, sampled, None),
            "mesh": decode(tiny_model(**kind), method, options, batch, sampled, mesh)}


def shards_worker() -> dict:
    """Per-device shards of weights and cache, read from the arrays; the memory refusal; the notes."""
    import warnings

    import numpy as np
    from flax import nnx

    import jax
    from cllm_jax.decode.engine import Decoder
    from cllm_jax.errors import CllmWarning, InputError
    from cllm_jax.parallel import decode_mesh

    out = {}
    for shape in ((1, 8), (2, 4)):
        model = tiny_model(heads=8, kv_heads=8, head_dim=8, adapter=True)  # everything divides 8
        mesh = decode_mesh.make_decode_mesh(*shape)
        decoder = Decoder(model, "ar", batch_size=8, mesh=mesh, max_new_tokens=MAX_NEW)  # places the adapter too
        decoder.generate(prompts(8))
        device = mesh.devices.flat[0]

        def held(array):  # fraction of the array's elements that one device holds
            (shard,) = [s for s in array.addressable_shards if s.device == device]
            return shard.data.size / array.size

        leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model))
        weights = {jax.tree_util.keystr(p): held(a) for p, a in leaves}
        base = [(a, held(a)) for p, a in leaves if "adapter" not in jax.tree_util.keystr(p)]
        (cache,) = decoder._caches.values()
        out["x".join(map(str, shape))] = {
            "weights": weights,
            "base_bytes_ratio": sum(a.nbytes * f for a, f in base) / sum(a.nbytes for a, _ in base),
            "cache": held(cache.keys), "cache_shard": list(cache.keys.addressable_shards[0].data.shape),
            "cache_shape": list(cache.keys.shape),
            "distinct_q_shards": len({str(s.index) for s in model.layers.q_proj[...].addressable_shards}),
        }
    # A model that does not fit is refused before it moves: its weights stay where they were.
    model = tiny_model()
    mesh = decode_mesh.make_decode_mesh(8, 1)
    one = sum(decode_mesh.per_device_bytes(model, 8, 32, mesh))  # the cache of batch 8
    eight = sum(decode_mesh.per_device_bytes(model, 8, 32, decode_mesh.make_decode_mesh(1, 8)))
    decode_mesh.free_bytes_per_device = lambda mesh: (one + eight) // 2
    decode_mesh.held_bytes = lambda model, mesh: 0  # as if loaded into another memory (the host's, on a GPU)
    try:
        Decoder(model, "ar", batch_size=8, mesh=mesh, max_new_tokens=MAX_NEW)
        out["refusal"] = None
    except InputError as error:
        out["refusal"] = str(error)
    out["unmoved"] = len(model.layers.q_proj[...].sharding.device_set)
    decode_mesh.free_bytes_per_device = lambda mesh: None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            Decoder(tiny_model(), "ar", batch_size=1, mesh=decode_mesh.make_decode_mesh(1, 8), max_new_tokens=4)
    out["notes"] = [str(w.message) for w in caught if issubclass(w.category, CllmWarning)]
    mesh = decode_mesh.make_decode_mesh(2, 4)
    with decode_mesh.using(mesh):  # how collection and the pipeline's evaluation pass a mesh to their decoders
        out["active"] = Decoder(tiny_model(), "ar", max_new_tokens=4).mesh is mesh
    out["after"] = Decoder(tiny_model(), "ar", max_new_tokens=4).mesh is None
    return out


def cpu_env(devices: int) -> dict:
    """A subprocess's environment: `devices` simulated CPU devices, and XLA's cheapest optimization, which
    halves compile times here (every comparison is between runs under the same flags)."""
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {fast}".strip()}


def run_worker(*args, devices=8, timeout=300):
    env = cpu_env(devices)
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [case_name(*c) for c in CASES])
@pytest.mark.parametrize("group", list(METHODS))
def test_every_method_decodes_on_a_mesh_as_on_one_device(group, case):
    r = run_worker("method", group, case)
    assert r["mesh"] == r["one"]  # tokens, passes, blocks, fast-forwarded, stationary, acceptance
    if case.endswith("b8-greedy"):
        rows = r["one"]
        assert any(row["tokens"][-1] == EOS and len(row["tokens"]) < MAX_NEW for row in rows), "no row hit EOS"
        assert any(len(row["tokens"]) == MAX_NEW for row in rows)


def test_per_layer_weights_and_cache_decode_on_a_mesh_as_on_one_device():
    r = run_worker("method", "ar-per-layer", case_name(*CASES[2]))
    assert r["mesh"] == r["one"]


@pytest.fixture(scope="module")
def shards():
    return run_worker("shards")


# What the rules leave whole: norms, and the adapter's factor on the embed side of a projection (its
# other axis is the rank, which is small; embed splits over fsdp, absent from a decoding mesh).
WHOLE = ("norm", *(f"{t}_proj_lora_a" for t in "qkv"), "gate_proj_lora_a", "up_proj_lora_a", "o_proj_lora_b",
         "down_proj_lora_b")


def test_each_device_holds_one_tensorth_of_every_sharded_array(shards):
    for shape, tensor in (("1x8", 8), ("2x4", 4)):
        r = shards[shape]
        for name, fraction in r["weights"].items():
            if not any(side in name for side in WHOLE):
                assert fraction == pytest.approx(1 / tensor), f"{shape} {name}"
        assert abs(r["base_bytes_ratio"] * tensor - 1) < 0.15, shape  # within 15% of 1/T
        data = int(shape.split("x")[0])
        assert r["cache"] == pytest.approx(1 / (tensor * data)), shape  # rows over data, kv heads over tensor
        layers, rows, length, kv, dim = r["cache_shape"]
        assert r["cache_shard"] == [layers, rows // data, length, kv // tensor, dim]
        assert r["distinct_q_shards"] == tensor  # T different pieces, each on data devices


def test_a_model_that_does_not_fit_is_refused_naming_a_mesh_that_fits(shards):
    assert shards["refusal"] is not None and "\n" not in shards["refusal"]
    assert "mesh data=8,tensor=1" in shards["refusal"] and "--mesh data=" in shards["refusal"]
    assert "--mesh data=8,tensor=1" not in shards["refusal"]
    assert shards["unmoved"] == 1


def test_replicated_dimensions_are_named_once(shards):
    (note,) = shards["notes"]
    assert "heads (4 over tensor=8)" in note and "kv_heads (2 over tensor=8)" in note


def test_a_mesh_set_for_a_stage_reaches_its_decoders(shards):
    assert shards["active"] and shards["after"]


def test_the_pipeline_checks_its_evaluation_mesh_when_loading():
    from cllm_jax.errors import CllmError
    from cllm_jax.evaluate.pipeline import EvaluateStage

    assert EvaluateStage(mesh="data=2,tensor=4").mesh == "data=2,tensor=4"
    with pytest.raises(CllmError, match="data=D,tensor=T"):
        EvaluateStage(mesh="model=2")


# --- collection ---------------------------------------------------------------------------------

QUESTIONS = [f"What is {a} plus {b}? Explain." for a, b in [(2, 3), (17, 25), (100, 1), (8, 8), (41, 1), (6, 77)]]


@pytest.fixture(scope="module")
def collect_inputs(tmp_path_factory):
    from tests.tiny import save_tiny_chat_model

    root = tmp_path_factory.mktemp("mesh_collect")
    save_tiny_chat_model(root / "tiny")
    prompts_file = root / "questions.jsonl"
    lines = (json.dumps({"prompt": q, "answer": str(i)}) + "\n" for i, q in enumerate(QUESTIONS))
    prompts_file.write_text("".join(lines))
    return root


def collect_cli(root, out, *extra):
    return [sys.executable, str(ROOT / "decode.py"), "collect", "--model", str(root / "tiny"), "--prompts",
            str(root / "questions.jsonl"), "--answer-field", "answer", "--out", str(out), "--block-size", "8",
            "--max-new-tokens", "24", "--batch-size", "2", "--no-clean", *extra]  # fmt: skip


CPU8 = cpu_env(8)


@pytest.fixture(scope="module")
def one_device_collection(collect_inputs):
    out = collect_inputs / "one"
    proc = subprocess.run(collect_cli(collect_inputs, out), env=CPU8, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_collection_on_a_mesh_is_byte_identical_to_one_device(collect_inputs, one_device_collection):
    from cllm_jax.data.trajectories import PROGRESS_FILE, TRAJECTORIES_FILE

    out = collect_inputs / "mesh"
    proc = subprocess.run(collect_cli(collect_inputs, out, "--mesh", "data=2,tensor=4"), env=CPU8,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "replicated, not divisible: kv_heads (2 over tensor=4)" in proc.stderr
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE):
        assert (out / name).read_bytes() == (one_device_collection / name).read_bytes()


def test_collection_on_a_mesh_resumes_after_a_kill(collect_inputs, one_device_collection):
    import signal
    import time

    from cllm_jax.data.trajectories import PROGRESS_FILE, TRAJECTORIES_FILE

    out = collect_inputs / "killed"
    progress = out / PROGRESS_FILE
    process = subprocess.Popen(collect_cli(collect_inputs, out, "--mesh", "data=2,tensor=4"), env=CPU8,
                               stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (progress.exists() and progress.read_text().count("\n") >= 2):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = progress.read_text().count("\n")
    assert 2 <= partial < len(QUESTIONS), "the kill must land mid-run for this test to mean anything"
    resumed = subprocess.run(collect_cli(collect_inputs, out, "--mesh", "data=8"), env=CPU8, capture_output=True,
                             text=True, timeout=120)  # resumed on another mesh: the records do not depend on it
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in (TRAJECTORIES_FILE, PROGRESS_FILE):
        assert (out / name).read_bytes() == (one_device_collection / name).read_bytes()


def decode_cli(root, *extra, command=()):
    return [sys.executable, str(ROOT / "decode.py"), *command, "--model", str(root / "tiny"), "--max-new-tokens", "16",
            *extra]


def test_decode_command_on_a_mesh_prints_what_one_device_prints(collect_inputs):
    args = ["--prompt", "What is 2 plus 3?", "--prompt", "Name a color.", "--method", "jacobi-rolling",
            "--block-size", "4", "--batch-size", "2", "--json"]
    runs = [subprocess.run(decode_cli(collect_inputs, *args, *mesh), env=CPU8, capture_output=True, text=True,
                           timeout=120) for mesh in ([], ["--mesh", "data=2,tensor=4"])]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    one, mesh = ([{k: r[k] for k in ("token_ids", "forward_passes", "fast_forwarded", "stationary")}
                  for r in map(json.loads, run.stdout.splitlines())] for run in runs)
    assert len(one) == 2 and mesh == one
    bad = subprocess.run(decode_cli(collect_inputs, *args, "--mesh", "data=3,tensor=4"), env=CPU8,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--mesh" in bad.stderr


def test_chat_on_a_mesh_answers_as_on_one_device(collect_inputs):
    runs = [subprocess.run(decode_cli(collect_inputs, *mesh, command=["chat"]), input="What is 2 plus 3?\n", env=CPU8,
                           capture_output=True, text=True, timeout=120) for mesh in ([], ["--mesh", "tensor=8"])]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.strip() and runs[1].stdout == runs[0].stdout
    assert "replicated, not divisible" in runs[1].stderr


def test_two_processes_collect_shards_that_merge_into_the_one_device_file(collect_inputs, one_device_collection):
    """Under jax.distributed each process collects its shard of the prompts on a mesh of its own devices;
    `decode.py merge` puts the records in prompt order."""
    import socket

    from cllm_jax.data.trajectories import TRAJECTORIES_FILE

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = cpu_env(2)
    procs = [subprocess.Popen(collect_cli(collect_inputs, collect_inputs / f"process{i}", "--mesh", "tensor=2",
                                          "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                          "--process-id", str(i)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    merged = collect_inputs / "merged"
    merge = subprocess.run([sys.executable, str(ROOT / "decode.py"), "merge", "--out", str(merged),
                            *(str(collect_inputs / f"process{i}") for i in (0, 1))], capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert (merged / TRAJECTORIES_FILE).read_bytes() == (one_device_collection / TRAJECTORIES_FILE).read_bytes()


# --- two processes ------------------------------------------------------------------------------

MULTIHOST = [("jacobi-rolling", True)]  # (method group, sampled), batch 8, with EOS


def multihost_worker(process_id: int, port: int) -> dict:
    """One of two processes with 4 CPU devices each: one data=2,tensor=4 mesh over both, so each
    process's devices hold half the prompts; every process gets every row back, in order."""
    from cllm_jax.parallel import decode_mesh, distributed

    distributed.initialize(True, f"127.0.0.1:{port}", 2, process_id)  # before anything touches a device
    mesh = decode_mesh.make_decode_mesh(2, 4)
    out = {}
    for group, sampled in MULTIHOST:
        method, options = METHODS[group]
        out[group] = decode(tiny_model(adapter=method == "jacobi-lossless"), method, options, 8, sampled, mesh)
    return out


def multihost_reference() -> dict:
    out = {}
    for group, sampled in MULTIHOST:
        method, options = METHODS[group]
        out[group] = decode(tiny_model(adapter=method == "jacobi-lossless"), method, options, 8, sampled, None)
    return out


def test_two_processes_decode_like_one_device():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), str(port)], env=cpu_env(4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    one = run_worker("multihost-reference", devices=1)
    for proc in procs:
        stdout, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(stdout.strip().splitlines()[-1]) == one


def test_two_decode_processes_print_what_one_device_prints(collect_inputs):
    """decode.py under jax.distributed: process 0 prints every prompt's result, in order; process 1 none."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [arg for q in ("What is 2 plus 3?", "Name a color.", "Count to five.", "Say hi.") for arg in ("--prompt", q)]
    args += ["--method", "ar", "--batch-size", "4", "--json"]  # the Jacobi methods: the test above
    env = cpu_env(2)
    procs = [subprocess.Popen(decode_cli(collect_inputs, *args, "--mesh", "data=2,tensor=2", "--coordinator",
                                         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    one = subprocess.run(decode_cli(collect_inputs, *args), env=env, capture_output=True, text=True, timeout=120)
    outs = []
    for proc in procs:
        stdout, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        outs.append(stdout)
    assert one.returncode == 0, one.stderr[-3000:]

    def tokens(stdout):  # the JSON lines (gloo's C++ logs connections on stdout too)
        return [(r["token_ids"], r["forward_passes"]) for r in map(json.loads, re.findall(r"^\{.*$", stdout, re.M))]

    assert len(tokens(one.stdout)) == 4 and tokens(outs[0]) == tokens(one.stdout) and tokens(outs[1]) == []


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "method":
        print(json.dumps(method_worker(sys.argv[2], sys.argv[3])))
    elif sys.argv[1] == "shards":
        print(json.dumps(shards_worker()))
    elif sys.argv[1] == "multihost-reference":
        print(json.dumps(multihost_reference()))
    elif sys.argv[1] == "multihost":
        print(json.dumps(multihost_worker(int(sys.argv[2]), int(sys.argv[3]))))
