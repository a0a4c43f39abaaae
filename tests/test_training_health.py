"""Training health: a collapsed or NaN run stops, exports nothing, and names a checkpoint that is good.

The claims are checked on the checkpoints themselves, with the model's forward pass: the one named
good gives finite logits, the one after it does not; a collapsed model's logits are flat (uniform).
"""

import jax
import numpy as np
import pytest
from flax import nnx

import train
from tests.test_checkpoint_resume import write_config, write_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("inputs"))


def checkpoint_logits(run_dir, model_dir, step: int) -> np.ndarray:
    """The logits of the model in checkpoint `step` on a fixed token sequence."""
    from cllm_jax.checkpoint import Checkpointer
    from cllm_jax.parallel import mesh as mesh_lib
    from cllm_jax.train import step as step_lib
    from cllm_jax.train.config import OptimSection
    from cllm_jax.weights.load import load_model

    model = load_model(model_dir, stacked=True).model  # a training state's layout: the stacked weights
    graphdef, params = nnx.split(model)
    tx, _ = step_lib.make_optimizer(OptimSection(lr=1e-3), 8)
    shardings = step_lib.state_shardings(params, tx, mesh_lib.single_device_mesh())
    abstract = step_lib.abstract_state(jax.eval_shape(lambda: params), tx, shardings)
    state, _ = Checkpointer(run_dir / "checkpoints").restore(abstract, step)
    restored = nnx.merge(graphdef, state.params)
    tokens = np.arange(3, 19, dtype=np.int32)[None]
    hidden, _ = restored(tokens, np.arange(16, dtype=np.int32)[None])
    return np.asarray(restored.logits(hidden))


def run_cli(config, capsys):
    code = train.main(["--config", str(config)])
    return code, capsys.readouterr().err.strip()


def test_a_collapsed_run_stops_and_its_model_is_uniform(tmp_path, inputs, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", *inputs, optim={"lr": 1e6, "warmup_ratio": 0.0},
                          checkpoint={"every": 1, "keep": 3})
    code, err = run_cli(config, capsys)
    assert code == 1 and "training collapsed to a uniform prediction at step 2" in err, err
    assert not (tmp_path / "run" / "export").exists()
    logits = checkpoint_logits(tmp_path / "run", inputs[0], 1)  # what step 2 ran on
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(jax.nn.log_softmax(logits), np.full(logits.shape, -np.log(128)), atol=1e-5)


def test_the_checkpoint_named_good_is_good_and_the_next_is_not(tmp_path, inputs, capsys):
    # warm-up: step 1 has learning rate 0, step 2 half of 1e30, so step 3's loss is the first NaN
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", *inputs,
                          optim={"lr": 1e30, "warmup_ratio": 0.25, "max_steps": 8}, checkpoint={"every": 1, "keep": 3})
    code, err = run_cli(config, capsys)
    assert code == 1 and "training diverged at step 3" in err, err
    assert f"the last good checkpoint is step 1 in {tmp_path / 'run' / 'checkpoints'}" in err, err
    assert np.all(np.isfinite(checkpoint_logits(tmp_path / "run", inputs[0], 1)))
    assert not np.all(np.isfinite(checkpoint_logits(tmp_path / "run", inputs[0], 2)))
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the float32 learning rate: inf, meant
def test_non_finite_final_parameters_are_not_exported(tmp_path, inputs, capsys):
    # lr 1e39 is infinite in float32: the only step's loss is finite, the parameters after it are not
    config = write_config(tmp_path / "c.yaml", tmp_path / "run", *inputs,
                          optim={"lr": 1e39, "warmup_ratio": 0.0, "max_steps": 1})
    code, err = run_cli(config, capsys)
    assert code == 1 and "the parameters after the last step 1 are not finite" in err, err
    assert "no checkpoint is good (step 1 holds the parameters that produced it)" in err, err
    assert not (tmp_path / "run" / "export").exists()


def test_a_checkpoint_with_non_finite_parameters_is_never_named(tmp_path):
    import jax.numpy as jnp

    from cllm_jax.checkpoint import Checkpointer
    from cllm_jax.train.health import last_good_checkpoint
    from cllm_jax.train.step import TrainState

    def state(w):
        return TrainState({"w": jnp.asarray(w, jnp.float32)}, (), jnp.int32(0), jnp.zeros(2, jnp.uint32))

    checkpointer = Checkpointer(tmp_path, every=1, keep=5)
    for step, w in [(1, [1.0, 2.0]), (2, [1.0, np.nan]), (3, [3.0, 4.0])]:  # NaN where no loss would see it
        checkpointer.save(step, state(w), {"epoch": 0, "cursor": step})
    checkpointer.wait()
    abstract = jax.eval_shape(lambda: state([0.0, 0.0]))
    assert last_good_checkpoint(checkpointer, abstract, failed_step=5) == (3, "")
    assert last_good_checkpoint(checkpointer, abstract, failed_step=4) == (1, "")
    assert last_good_checkpoint(checkpointer, abstract, failed_step=2) == (
        None, "step 3 comes after it; step 2 comes after it; step 1 holds the parameters that produced it")
    checkpointer.close()
