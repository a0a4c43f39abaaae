"""The method works: a model trained on its own Jacobi trajectories decodes in fewer forward passes.

Measured with the decoding engine (not the training loss): a tiny random model, its greedy Jacobi
trajectories on eight prompts, a few hundred consistency + AR steps, then Jacobi decoding again.
"""

import numpy as np

from cllm_jax.data.collect import CollectOptions, records_for
from cllm_jax.decode.engine import Decoder, summarize
from cllm_jax.train.config import config_from_dict
from cllm_jax.train.loop import run
from cllm_jax.weights.load import load_model
from tests.tiny import port, random_prompts, torch_model

BLOCK, BUDGET = 8, 32


def jacobi(model, prompts):
    settings = dict(method="jacobi", max_new_tokens=BUDGET, block_size=BLOCK, record=True, batch_size=8)
    return Decoder(model, **settings).generate(prompts)


def test_training_on_own_trajectories_raises_tokens_per_forward(tmp_path):
    model = port(torch_model("llama", num_key_value_heads=2))
    prompts = random_prompts([8] * 8, seed=4)
    before = jacobi(model, prompts)
    options = CollectOptions(block_size=BLOCK, max_new_tokens=BUDGET, clean=False)
    records = [r for i, (p, g) in enumerate(zip(prompts, before)) for r in records_for(i, p, g, None, options, None, None)[0]]
    config = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"layout": "packed", "ar_source": "teacher", "max_seq_len": 128, "pad_multiple": 16},
        "optim": {"lr": 3e-3, "max_steps": 600, "batch_size": 1},
        "checkpoint": {"every": 10_000, "asynchronous": False},
        "log": {"progress": False},
    })  # fmt: skip
    run(config, model=model, records=records)
    after = jacobi(load_model(tmp_path / "run").model, prompts)

    tpf_before, tpf_after = summarize(before)["tokens_per_forward"], summarize(after)["tokens_per_forward"]
    assert tpf_before < 1.1  # an ordinary model: Jacobi barely beats one token per pass
    assert tpf_after > 1.5 * tpf_before, (tpf_before, tpf_after)
    assert np.mean([a.token_ids == b.token_ids for a, b in zip(before, after)]) >= 0.75
