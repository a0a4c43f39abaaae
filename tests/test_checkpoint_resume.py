"""Checkpoints: kill -9 mid-run and resume, restore onto another mesh, NaN stop, export, config.

Runs that must die (SIGKILL) or need 8 simulated devices (JAX_NUM_CPU_DEVICES=8) run in a
subprocess: this file run as a script (`kill CONFIG STEP` or `mesh DIR`). The rest runs in-process
on the suite's single CPU device.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_inputs(directory: Path) -> tuple[Path, Path]:
    """A tiny random model as a Hugging Face directory and 8 trajectory records as JSONL."""
    from flax import nnx

    from cllm_jax.config import ModelConfig
    from cllm_jax.model.llama import Llama
    from cllm_jax.weights.load import export_model

    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, eos_token_id=2, bos_token_id=1)
    model_dir = export_model(Llama(config, rngs=nnx.Rngs(0)), directory / "model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        prompt = [int(t) for t in rng.integers(3, 128, 4 + i)]
        fixed = [int(t) for t in rng.integers(3, 128, 8)]
        states = [fixed[: j + 1] + [int(t) for t in rng.integers(3, 128, 7 - j)] for j in range(3)] + [fixed]
        lines.append(json.dumps({"data_id": i, "jacobian_itr_id": 0, "prompt_ids_len": len(prompt),
                                 "prompt_ids": prompt, "answer_trajectory_ids": states,
                                 "teacher_output_ids": prompt + fixed, "complete_teacher_output_ids": prompt + fixed}))
    data = directory / "trajectories.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data


def write_config(path: Path, run_dir: Path, model_dir: Path, data: Path, **sections) -> Path:
    config = {
        "run_dir": str(run_dir),
        "model": {"path": str(model_dir), "remat": True},
        "data": {"trajectories": [str(data)], "pad_multiple": 32, "max_seq_len": 64},
        "optim": {"lr": 1e-3, "batch_size": 2, "epochs": 2},
        "checkpoint": {"every": 3, "keep": 2},
        "log": {"progress": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def run_in_process(config_path: Path):
    from cllm_jax.train.config import load_config
    from cllm_jax.train.loop import run

    return run(load_config(config_path))


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, inputs):
    from cllm_jax.train.metrics_log import read_metrics
    from cllm_jax.weights.hf_dir import read_hf_dir

    straight = run_in_process(write_config(tmp_path / "a.yaml", tmp_path / "a", *inputs))
    assert straight.steps == 8

    config_b = write_config(tmp_path / "b.yaml", tmp_path / "b", *inputs)
    killed = subprocess.run([sys.executable, __file__, "kill", str(config_b), "5"], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [m["step"] for m in read_metrics(tmp_path / "b")] == [1, 2, 3, 4, 5]
    assert not (tmp_path / "b" / "export").exists()
    from cllm_jax.checkpoint import Checkpointer

    # step 6 was never reached; step 3's asynchronous save normally finished before the kill (if
    # it had not, orbax discards the partial directory and the run restarts from step 0)
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() in ([3], [])

    resumed = run_in_process(config_b)  # resumes from the step-3 checkpoint
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "loss_consistency", "loss_ar", "grad_norm", "lr"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-6, err_msg=key)
    _, tensors_a = read_hf_dir(straight.export_dir)
    _, tensors_b = read_hf_dir(resumed.export_dir)
    for name in tensors_a:
        np.testing.assert_allclose(tensors_b[name], tensors_a[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_distilling_run_resumes_against_the_loaded_base_model(tmp_path, inputs):
    """loss.ar_target=base: after a resume the AR term still distils the model loaded from model.path
    (not the checkpoint's trained one), so the losses equal an uninterrupted run's. The first step's
    AR term is the base's own entropy, below the hard-label cross-entropy of the same step."""
    from cllm_jax.checkpoint import Checkpointer
    from cllm_jax.train.config import load_config
    from cllm_jax.train.loop import run
    from cllm_jax.train.metrics_log import read_metrics

    class Stop(Exception):
        pass

    def stop_at_5(step):
        if step == 5:
            raise Stop

    distil = {"ar_target": "base"}
    run_in_process(write_config(tmp_path / "a.yaml", tmp_path / "a", *inputs, loss=distil))
    config_b = write_config(tmp_path / "b.yaml", tmp_path / "b", *inputs, loss=distil)
    with pytest.raises(Stop):
        run(load_config(config_b), after_step=stop_at_5)
    assert Checkpointer(tmp_path / "b" / "checkpoints").all_steps() == [3]
    run_in_process(config_b)  # resumes from the step-3 checkpoint
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [m["step"] for m in b] == list(range(1, 9))
    for key in ("loss", "loss_ar", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=1e-6, err_msg=key)
    hard = run_in_process(write_config(tmp_path / "c.yaml", tmp_path / "c", *inputs, optim={"max_steps": 1}))
    assert 0 < a[0]["loss_ar"] < hard.last_metrics["loss_ar"]
    # a run written before the key existed resumes at its default (tokens)
    stored = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    del stored["loss"]["ar_target"]
    (tmp_path / "c" / "config.yaml").write_text(yaml.safe_dump(stored))
    assert run_in_process(tmp_path / "c.yaml").steps == 1


def test_export_loads_as_a_model_and_config_is_saved(tmp_path, inputs):
    from cllm_jax.checkpoint import latest_export
    from cllm_jax.errors import CheckpointError, ConfigError
    from cllm_jax.train.config import load_config
    from cllm_jax.weights.load import load_model

    config_path = write_config(tmp_path / "c.yaml", tmp_path / "c", *inputs, optim={"max_steps": 2})
    result = run_in_process(config_path)
    assert latest_export(tmp_path / "c") == result.export_dir
    loaded = load_model(tmp_path / "c")  # decode.py --model RUN_DIR goes through this
    assert loaded.path == result.export_dir and loaded.config.num_layers == 2
    assert load_config(tmp_path / "c" / "config.yaml") == load_config(config_path)  # the resolved config
    with pytest.raises(CheckpointError):
        latest_export(tmp_path)
    changed = write_config(tmp_path / "c2.yaml", tmp_path / "c", *inputs, optim={"max_steps": 2, "lr": 5e-4})
    with pytest.raises(ConfigError, match="optim.lr"):
        run_in_process(changed)


def test_nan_loss_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, inputs):
    config = write_config(tmp_path / "n.yaml", tmp_path / "n", *inputs, optim={"lr": 1e30, "warmup_ratio": 0.0},
                          checkpoint={"every": 1})
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training diverged at step 2" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    # step 1's update (lr 1e30) made the parameters that gave step 2 its NaN: checkpoint 1 is not good
    assert "no checkpoint is good (step 1 holds the parameters that produced it)" in lines[0]
    assert sorted(int(p.name) for p in (tmp_path / "n" / "checkpoints").iterdir() if p.name.isdigit()) == [1]


def test_bad_override_is_one_line_error(tmp_path, inputs):
    config = write_config(tmp_path / "e.yaml", tmp_path / "e", *inputs)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), "optim.lrr=1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown key optim.lrr")
    assert "Traceback" not in proc.stderr


def test_recipes_parse_and_overrides_apply():
    from cllm_jax.errors import ConfigError
    from cllm_jax.train.config import load_config

    gpu = load_config(ROOT / "configs" / "llama7b_gpu.yaml")
    assert (gpu.optim.lr, gpu.optim.weight_decay, gpu.optim.warmup_ratio, gpu.optim.epochs) == (2e-5, 0.0, 0.03, 1)
    assert gpu.model.dtype == "bfloat16" and gpu.loss.ar_weight == 10.0 and gpu.loss.label_smoothing == 0.1
    cpu = load_config(ROOT / "configs" / "smollm2_cpu.yaml",
                      ["optim.lr=1e-5", "data.trajectories=[a, b]", "mesh.fsdp=2", "loss.distance=js", "seed=3"])
    assert cpu.optim.lr == 1e-5 and cpu.data.trajectories == ("a", "b") and cpu.mesh.fsdp == 2
    assert cpu.loss.distance == "js" and cpu.seed == 3 and cpu.data.layout == "packed"
    assert load_config(None, ["data.trajectories=one"]).data.trajectories == ("one",)
    for bad in ("loss.distance=kl", "optim.batch_size=two", "optim.batch_size=0", "nosuch=1", "optim"):
        with pytest.raises(ConfigError):
            load_config(None, [bad])


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, __file__, "mesh", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("2x2x2", "1x1x1"):
        assert out[name]["exact"], name  # every leaf (params, Adam moments, step, RNG) restored bit for bit
        np.testing.assert_allclose(out[name]["next_loss"], out["continued_loss"], rtol=2e-5)
    assert out["2x2x2"]["q_proj_spec"] == "P(None, 'fsdp', 'tensor')"
    assert out["data"] == {"epoch": 0, "cursor": 16}


def test_a_save_interrupted_by_a_kill_is_cleared_before_the_next_run(tmp_path):
    import jax.numpy as jnp

    from cllm_jax.checkpoint import Checkpointer

    # what a SIGKILL during step 3's asynchronous save leaves behind
    leftover = tmp_path / "3.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    look = Checkpointer(tmp_path)  # e.g. a status check, opened before the resumed run
    assert look.all_steps() == [] and not leftover.exists()
    run = Checkpointer(tmp_path, every=3)
    assert run.save(3, {"w": jnp.ones(3)}, {"epoch": 0, "cursor": 3}, force=True)
    run.close()
    look.close()
    assert Checkpointer(tmp_path).all_steps() == [3]


# ---------------------------------------------------------------- subprocess workers

def kill_worker(config_path: str, kill_step: int) -> None:
    from cllm_jax.train.config import load_config
    from cllm_jax.train.loop import run

    def after_step(step):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)

    run(load_config(config_path), after_step=after_step)


def mesh_worker(directory: str) -> None:
    import jax
    from flax import nnx

    from cllm_jax.checkpoint import Checkpointer
    from cllm_jax.parallel import distributed
    from cllm_jax.parallel import mesh as mesh_lib
    from cllm_jax.train import step as step_lib
    from cllm_jax.train.config import OptimSection
    from tests.test_train_sharding import run_steps, tiny_setup

    model, records, spec = tiny_setup()
    _, params = nnx.split(model)
    losses, _, state = run_steps(model, records, spec, mesh_lib.make_mesh(2, 4, 1), steps=1)
    saved = jax.device_get(state)
    checkpointer = Checkpointer(Path(directory) / "ckpt", every=1, keep=2)
    checkpointer.save(1, state, {"epoch": 0, "cursor": 16})
    checkpointer.close()

    graphdef = nnx.graphdef(model)
    tx, schedule = step_lib.make_optimizer(OptimSection(lr=1e-3, warmup_ratio=0.0), 10)
    options = step_lib.StepOptions(shared_target=spec.shared_target)
    from cllm_jax.train.batching import DataSource

    hb = DataSource(records, spec).batch(0, 16, (2, 8))
    out = {}
    for name, mesh in [("continued", mesh_lib.make_mesh(2, 4, 1)), ("2x2x2", mesh_lib.make_mesh(2, 2, 2)),
                       ("1x1x1", mesh_lib.single_device_mesh())]:
        shardings = step_lib.state_shardings(params, tx, mesh)
        restored, data = Checkpointer(Path(directory) / "ckpt").restore(
            step_lib.abstract_state(jax.eval_shape(lambda: params), tx, shardings))
        host = jax.device_get(restored)
        exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(host)))
        fn = step_lib.compile_train_step(graphdef, tx, schedule, options, mesh, shardings,
                                         {k: v.ndim for k, v in hb.arrays.items()})
        batch = {k: distributed.global_array(v, mesh_lib.batch_sharding(mesh, v.ndim), v.shape)
                 for k, v in hb.arrays.items()}
        q_spec = str(restored.params["layers"]["q_proj"][...].sharding.spec)
        _, metrics = fn(restored, batch)
        if name == "continued":
            out["continued_loss"] = float(metrics["loss"])
        else:
            out[name] = {"exact": exact, "next_loss": float(metrics["loss"]), "q_proj_spec": q_spec}
        out["data"] = data
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1] == "kill":
        kill_worker(sys.argv[2], int(sys.argv[3]))
    else:
        mesh_worker(sys.argv[2])

