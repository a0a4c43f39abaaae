"""TensorBoard logging: the event files, read back by TensorBoard's own reader, hold metrics.jsonl's scalars.

The run is interrupted after step 5 and resumed from its step-3 checkpoint, so steps 4 and 5 are
logged twice: the resumed writer purges the first ones, and TensorBoard shows one run.
"""

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cllm_jax.train.config import load_config
from cllm_jax.train.loop import run
from cllm_jax.train.metrics_log import read_metrics
from tests.test_checkpoint_resume import write_config, write_inputs


class Stop(Exception):
    pass


def test_tensorboard_scalars_equal_metrics_jsonl_across_a_resume(tmp_path):
    inputs = write_inputs(tmp_path / "inputs")
    config = load_config(write_config(tmp_path / "c.yaml", tmp_path / "run", *inputs, log={"tensorboard": True},
                                      optim={"max_steps": 8}, checkpoint={"every": 3}))

    def stop_after_5(step):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        run(config, after_step=stop_after_5)
    run(config)  # resumes from step 3: steps 4 and 5 again

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for key in ("loss", "loss_consistency", "loss_ar", "grad_norm", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == list(range(1, 9)), key
        np.testing.assert_allclose([s.value for s in scalars], [m[key] for m in metrics], rtol=1e-6, err_msg=key)
