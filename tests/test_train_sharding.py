"""A sharded train step equals the single-device step (8 simulated CPU devices).

The comparison runs in a subprocess started with JAX_NUM_CPU_DEVICES=8, because the device count is
fixed when JAX initialises and the rest of the suite runs on one device. The subprocess is this
file run as a script; it prints one JSON line of results.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def tiny_setup(layout="per_record", batch_size=8, grad_accum=2, seed=0):
    """A tiny random model, records with different prompt lengths, and one StepOptions/BatchSpec."""
    from flax import nnx

    from cllm_jax.config import ModelConfig
    from cllm_jax.data.trajectories import TrajectoryRecord
    from cllm_jax.model.llama import Llama
    from cllm_jax.train.batching import BatchSpec

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, eos_token_id=2)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(batch_size * grad_accum * 2):
        prompt = tuple(int(t) for t in rng.integers(3, 128, 3 + i % 7))
        fixed = tuple(int(t) for t in rng.integers(3, 128, 8))
        states = [tuple(fixed[: j + 1]) + tuple(int(t) for t in rng.integers(3, 128, 7 - j)) for j in range(3)]
        records.append(TrajectoryRecord(
            data_id=i,
            jacobian_itr_id=0,
            prompt_ids_len=len(prompt),
            prompt_ids=prompt,
            answer_trajectory_ids=tuple(states) + (fixed,),
            teacher_output_ids=prompt + fixed,
            complete_teacher_output_ids=prompt + fixed,
        ))
    spec = BatchSpec.of(layout=layout, pad_multiple=16)
    return Llama(config, rngs=nnx.Rngs(seed)), records, spec


def run_steps(model, records, spec, mesh, steps=2, batch_size=8, grad_accum=2):
    """Losses of `steps` optimizer steps on `mesh`, the final params on the host, and the state."""
    import jax
    from flax import nnx

    from cllm_jax.parallel import distributed
    from cllm_jax.parallel import mesh as mesh_lib
    from cllm_jax.train import step as step_lib
    from cllm_jax.train.config import OptimSection
    from cllm_jax.train.batching import DataSource

    graphdef, params = nnx.split(model)
    tx, schedule = step_lib.make_optimizer(OptimSection(lr=1e-3, warmup_ratio=0.0), 10)
    shardings = step_lib.state_shardings(params, tx, mesh)
    state = step_lib.init_state(jax.device_get(params), tx, shardings, seed=0)
    options = step_lib.StepOptions(layout=spec.layout, shared_target=spec.shared_target)
    data = DataSource(records, spec)
    losses, fn = [], None
    for s in range(steps):
        hb = data.batch(0, s * batch_size * grad_accum, (grad_accum, batch_size))
        batch = {k: distributed.global_array(v, mesh_lib.batch_sharding(mesh, v.ndim), v.shape)
                 for k, v in hb.arrays.items()}
        if fn is None:
            fn = step_lib.compile_train_step(graphdef, tx, schedule, options, mesh, shardings,
                                             {k: v.ndim for k, v in batch.items()})
        state, metrics = fn(state, batch)
        losses.append({k: float(v) for k, v in metrics.items()})
    return losses, jax.device_get(state.params), state


def worker() -> None:
    import jax

    from cllm_jax.parallel import mesh as mesh_lib

    assert jax.device_count() == 8, jax.devices()
    out = {}
    for layout in ("per_record", "packed"):
        model, records, spec = tiny_setup(layout)
        base_losses, base_params, _ = run_steps(model, records, spec, mesh_lib.single_device_mesh())
        leaves = jax.tree.leaves(base_params)
        for shape in MESHES if layout == "per_record" else MESHES[-1:]:
            mesh = mesh_lib.make_mesh(*shape)
            losses, params, state = run_steps(model, records, spec, mesh)
            diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(leaves, jax.tree.leaves(params))]
            out[f"{layout}-{'x'.join(map(str, shape))}"] = {
                "base": base_losses, "sharded": losses, "max_param_diff": max(diffs),
                "param_change": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                    for a, b in zip(leaves, jax.tree.leaves(nnx_params(model)))),
                "q_proj_spec": str(state.params["layers"]["q_proj"][...].sharding.spec),
                "embed_shard": list(state.params["embed"][...].addressable_shards[0].data.shape),
                "mu_spec": str(jax.tree.leaves(state.opt_state)[1].sharding.spec),
            }
    print(json.dumps(out))


def nnx_params(model):
    import jax
    from flax import nnx

    return jax.device_get(nnx.state(model))


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [f"per_record-{'x'.join(map(str, m))}" for m in MESHES] + ["packed-2x2x2"])
def test_sharded_step_equals_single_device(results, name):
    r = results[name]
    for base, sharded in zip(r["base"], r["sharded"]):
        for key in ("loss", "loss_consistency", "loss_ar", "grad_norm"):
            np.testing.assert_allclose(sharded[key], base[key], rtol=2e-5, err_msg=key)
        assert sharded["consistency_tokens"] == base["consistency_tokens"]
    assert r["param_change"] > 1e-3  # two AdamW steps of lr 1e-3 moved the parameters by up to 2e-3
    # Adam divides by sqrt(v): fp32 reduction-order noise in tiny gradients shows up as at most ~0.3 %
    # of a step; a sharding mistake moves parameters by whole steps.
    assert r["max_param_diff"] < 2e-5


def test_parameters_are_sharded_by_the_rules(results):
    assert results["per_record-8x1x1"]["q_proj_spec"] == "P(None, None, None)"
    assert results["per_record-2x4x1"]["q_proj_spec"] == "P(None, 'fsdp', None)"
    assert results["per_record-2x2x2"]["q_proj_spec"] == "P(None, 'fsdp', 'tensor')"
    assert results["per_record-2x2x2"]["embed_shard"] == [64, 32]  # vocab 128 / tensor 2, embed 64 / fsdp 2
    assert results["per_record-2x4x1"]["embed_shard"] == [128, 16]
    assert results["per_record-2x2x2"]["mu_spec"] == "P('tensor', 'fsdp')"  # Adam moments follow their params


def multihost_config(run_dir: str, **distributed):
    from cllm_jax.train.config import config_from_dict

    return config_from_dict({"run_dir": run_dir, "export": False, "distributed": distributed,
                             "optim": {"batch_size": 8, "grad_accum": 2, "max_steps": 3, "lr": 1e-3},
                             "data": {"pad_multiple": 16}, "checkpoint": {"every": 2}, "log": {"progress": False}})


def multihost_worker(process_id: int, port: int, run_dir: str) -> None:
    """One of two processes with 4 CPU devices each: one 8-device mesh over both."""
    from cllm_jax.parallel import distributed
    from cllm_jax.train.loop import run

    distributed.initialize(True, f"127.0.0.1:{port}", 2, process_id)  # before anything touches a device
    model, records, _ = tiny_setup()
    run(multihost_config(run_dir, enabled=True), model=model, records=records)


def test_two_processes_train_like_one(tmp_path):
    """jax.distributed over loopback: 2 processes x 4 devices give the single-process losses."""
    import socket

    from cllm_jax.train.loop import run
    from cllm_jax.train.metrics_log import read_metrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, __file__, "multihost", str(i), str(port), str(tmp_path / "multi")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    model, records, _ = tiny_setup()
    run(multihost_config(str(tmp_path / "single")), model=model, records=records)
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    single, multi = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    assert [m["step"] for m in multi] == [1, 2, 3]
    for key in ("loss", "loss_consistency", "loss_ar", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in multi], [m[key] for m in single], rtol=2e-5, err_msg=key)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "multihost":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        multihost_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        worker()
