"""The pipeline's second round on a tiny model: it collects with the trained model at a larger n,
trains on from the first round's weights, and resumes/skips like the other stages."""

import json

import jax
import numpy as np
import pytest
import yaml

from cllm_jax.data.collect import model_fingerprint
from cllm_jax.data.trajectories import read_trajectories
from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.pipeline import load_pipeline_config, run_pipeline
from cllm_jax.weights.load import load_model
from tests.tiny import save_tiny_chat_model


def recipe(tmp_path, second_round):
    values = yaml.safe_load(open("configs/smollm2_gsm8k_jf.yaml"))
    values |= {"run_dir": str(tmp_path / "run"), "report_dir": str(tmp_path / "report"),
               "model": str(tmp_path / "tiny")}
    values["collect"] |= {"limit": 2, "block_size": 4, "max_new_tokens": 8, "clean": False}
    values["train"]["optim"] |= {"max_steps": 2}
    values["train"]["checkpoint"] |= {"every": 1, "asynchronous": False}
    values["train"]["log"] |= {"progress": False}
    values["evaluate"] |= {"limit": 1, "max_new_tokens": 8, "block_sizes": [4], "include_transformers": False}
    values["second_round"] = second_round
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_second_round_collects_with_the_trained_model_and_trains_on(tmp_path):
    save_tiny_chat_model(tmp_path / "tiny")
    # lr 0 in round 2: its export must be exactly the first round's weights it started from
    path = recipe(tmp_path, {"collect": {"block_size": 8}, "train": {"optim": {"lr": 0.0, "max_steps": 1}}})
    config = load_pipeline_config(path)
    assert config.second_round.train.optim.lr == 0.0 and config.second_round.train.optim.max_steps == 1
    assert config.train.optim.lr > 0 and config.second_round.collect.options.block_size == 8
    messages = []
    run_pipeline(config, say=messages.append)

    run = tmp_path / "run"
    first, second = load_model(run / "train"), load_model(run / "round2" / "train")
    for a, b in zip(jax.tree.leaves(first.model), jax.tree.leaves(second.model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    base = load_model(tmp_path / "tiny")
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(base.model), jax.tree.leaves(first.model)))
    # round 2's trajectories: the first round's model, at n = 8
    summary = json.loads((run / "round2" / "trajectories" / "summary.json").read_text())
    assert summary["fingerprint"]["model"] == json.loads(json.dumps(model_fingerprint(first)))
    records = read_trajectories(run / "round2" / "trajectories")
    assert records and {r.block_size for r in records} == {8}
    assert {r.block_size for r in read_trajectories(run / "trajectories")} == {4}

    again = []
    run_pipeline(load_pipeline_config(path), say=again.append)
    assert any("round 2 train: done" in m for m in again)


def test_second_round_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="second_round.collect.blocksize"):
        load_pipeline_config(recipe(tmp_path, {"collect": {"blocksize": 32}}))
    with pytest.raises(ConfigError, match="second_round takes"):
        load_pipeline_config(recipe(tmp_path, {"rounds": 2}))
