"""On the tiny model, the new recipe (the config defaults: prompt-masked AR without smoothing,
progressive schedule, per-block normalisation, target-only EOS) beats today's recipe at equal steps,
measured as Jacobi tokens per forward pass after training (the setup of test_cllm_method.py)."""

from cllm_jax.data.collect import CollectOptions, records_for
from cllm_jax.decode.engine import summarize
from cllm_jax.train.config import config_from_dict
from cllm_jax.train.loop import run
from cllm_jax.weights.load import load_model
from tests.test_cllm_method import BLOCK, BUDGET, jacobi
from tests.tiny import port, random_prompts, torch_model

TODAY = {"data": {"noise_schedule": "uniform", "context": "clean"},
         "loss": {"ar_on_prompt": True, "ar_after_eos": True, "consistency_norm": "tokens",
                  "student_eos_pads": True, "label_smoothing": 0.1}}


def trained_tpf(tmp_path, name, recipe, prompts, records):
    base = {"run_dir": str(tmp_path / name),
            "data": {"layout": "packed", "ar_source": "teacher", "max_seq_len": 128, "pad_multiple": 16},
            "optim": {"lr": 3e-3, "max_steps": 600, "batch_size": 1},
            "checkpoint": {"every": 10_000, "asynchronous": False}, "log": {"progress": False}}
    values = {k: (v | recipe.get(k, {})) if isinstance(v, dict) else v for k, v in base.items()}
    values.setdefault("loss", recipe.get("loss", {}))
    run(config_from_dict(values), model=port(torch_model("llama", num_key_value_heads=2)), records=records)
    return summarize(jacobi(load_model(tmp_path / name).model, prompts))["tokens_per_forward"]


def test_new_recipe_beats_todays_at_equal_steps(tmp_path):
    model = port(torch_model("llama", num_key_value_heads=2))
    prompts = random_prompts([8] * 8, seed=4)
    before = jacobi(model, prompts)
    options = CollectOptions(block_size=BLOCK, max_new_tokens=BUDGET, clean=False)
    records = [r for i, (p, g) in enumerate(zip(prompts, before))
               for r in records_for(i, p, g, None, options, None, None)[0]]
    today = trained_tpf(tmp_path, "today", TODAY, prompts, records)
    new = trained_tpf(tmp_path, "new", {}, prompts, records)
    assert new > today > summarize(before)["tokens_per_forward"], (today, new)
