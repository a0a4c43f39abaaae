"""The end-to-end pipeline on a tiny model: every stage runs, resumes, and the report has its fields."""

import json
from pathlib import Path

import pytest
import yaml

from cllm_jax.evaluate.pipeline import load_pipeline_config, run_pipeline
from tests.tiny import save_tiny_chat_model


def test_pipeline_runs_resumes_and_reports(tmp_path):
    save_tiny_chat_model(tmp_path / "tiny")
    recipe = yaml.safe_load(open("configs/smollm2_gsm8k.yaml"))
    recipe |= {"run_dir": str(tmp_path / "run"), "report_dir": str(tmp_path / "report"), "model": str(tmp_path / "tiny")}
    recipe["collect"] |= {"limit": 3, "block_size": 4, "max_new_tokens": 12, "clean": False}
    recipe["train"]["optim"] |= {"max_steps": 3}
    recipe["train"]["checkpoint"] |= {"every": 2, "asynchronous": False}
    recipe["train"]["log"] |= {"progress": False}
    recipe["evaluate"] |= {"limit": 2, "max_new_tokens": 12, "block_sizes": [2, 4], "recycle": 2}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    messages = []
    report = run_pipeline(load_pipeline_config(path), say=messages.append)

    methods = report["methods"]
    # AR; per size: Jacobi and rolling + lookup on the base, Jacobi, rolling, multiblock, multiblock + recycling,
    # rolling + lookup on the CLLM; transformers x 2
    assert len(methods) == 17
    for name, m in methods.items():
        assert set(m) == {"weights", "method", "verifies_with_base", "prompts", "timed_prompts", "tpf",
                          "tokens_per_second", "speedup", "accuracy", "agreement", "base_nll_ratio", "block_size",
                          "distinct_4gram_share", "at_token_limit", "acceptance"}
        assert m["tokens_per_second"] > 0 and m["base_nll_ratio"] > 0
    assert methods["ar (base)"]["tpf"] == 1.0 and methods["ar (base)"]["speedup"] == 1.0
    assert methods["ar (base)"]["base_nll_ratio"] == 1.0 and methods["ar (base)"]["block_size"] is None
    # the same base weights: Jacobi and transformers' greedy reproduce our AR exactly, so the same NLL
    for name in ("jacobi (base) n=2", "jacobi (base) n=4", "jacobi-rolling + lookup (base) n=4",
                 "transformers generate (base)"):
        assert methods[name]["agreement"]["generation"] == 1.0
        assert methods[name]["base_nll_ratio"] == pytest.approx(1.0)
    # every method on the CLLM is greedy on one model: one text, one ratio
    cllm = [m for name, m in methods.items() if "(cllm)" in name]
    assert len(cllm) == 10 and {m["block_size"] for m in cllm} == {2, 4}
    assert all(m["base_nll_ratio"] == pytest.approx(cllm[0]["base_nll_ratio"]) for m in cllm)
    for name in ("report.md", "report.json", "generations.jsonl", "speedup.png", "tpf_distribution.png",
                 "trajectory.png", "config.yaml"):
        assert (tmp_path / "report" / name).is_file(), name
    assert json.loads((tmp_path / "report" / "report.json").read_text())["methods"] == methods

    # a second run finds every stage complete and only rewrites the report
    again = []
    run_pipeline(load_pipeline_config(path), say=again.append)
    assert any("train: done" in m for m in again) and any("evaluate: done" in m for m in again)


def test_adapter_pipeline_with_variants_lossless_rows_and_humaneval(tmp_path):
    """The adapter recipe's shape on a tiny model: an adapter and a gated variant train on one
    collection; lossless rows reproduce the base model's answers on every problem; HumanEval answers are
    executed; rows past timing_limit decode batched; generations.jsonl holds every row's every answer."""
    save_tiny_chat_model(tmp_path / "tiny")
    recipe = yaml.safe_load(open("configs/smollm2_gsm8k_adapter.yaml"))
    recipe |= {"run_dir": str(tmp_path / "run"), "report_dir": str(tmp_path / "report"), "model": str(tmp_path / "tiny"),
               "variants": {"gated": {"adapter": {"gated": True}}}}
    recipe["collect"] |= {"limit": 3, "block_size": 4, "max_new_tokens": 12, "clean": False}
    recipe["train"]["optim"] |= {"max_steps": 3}
    recipe["train"]["checkpoint"] |= {"every": 2, "asynchronous": False}
    recipe["train"]["log"] |= {"progress": False}
    recipe["evaluate"] = {
        "task": "humaneval", "limit": 3, "max_new_tokens": 12, "block_sizes": [4], "timing_limit": 1, "batch_size": 2,
        "include_transformers": False,
        "rows": [{"weights": "base", "method": "ar"},
                 {"weights": "cllm", "method": "jacobi-lossless", "layout": "rows"},
                 {"weights": "gated", "method": "jacobi-lossless", "layout": "gated", "init": "prefix-sample"},
                 {"weights": "cllm", "method": "jacobi-rolling", "full": False}],
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run_pipeline(load_pipeline_config(path), say=[].append)

    methods = report["methods"]
    assert list(methods) == ["ar (base)", "jacobi-lossless rows + lookup (cllm)", "jacobi-lossless gated (gated)",
                             "jacobi-rolling + lookup (cllm)"]
    for name in ("jacobi-lossless rows + lookup (cllm)", "jacobi-lossless gated (gated)"):
        assert methods[name]["agreement"]["generations_equal"] == 3 and methods[name]["prompts"] == 3
    assert methods["jacobi-rolling + lookup (cllm)"]["prompts"] == 1  # not full: the timed prompt only
    assert report["judged"]["executed"] >= 1
    for name in ("cllm", "gated"):  # what each trained weights cost: 3 steps, an adapter well under the model
        facts = report["training"][name]
        assert facts["adapter"] and facts["steps"] == 3 and 0 < facts["export_share_of_base"] < 1, facts
    lines = [json.loads(line) for line in (tmp_path / "report" / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 3 + 3 + 1
    assert {line["task_id"] for line in lines} == {"HumanEval/0", "HumanEval/1", "HumanEval/2"}
    assert all(set(line) == {"task_id", "method", "text", "token_ids", "forward_passes", "passed"} for line in lines)
    assert "Lossless rows" in (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "run" / "train" / "export" / "adapter_config.json").is_file()


def test_drafter_pipeline_collects_by_ar_trains_placeholders_and_reports_acceptance(tmp_path):
    """The placeholder drafter recipe's shape on a tiny model: AR collection, the drafter's objective, the
    lossless-placeholder rows equal to the base's AR text with acceptance by draft position reported."""
    save_tiny_chat_model(tmp_path / "tiny")
    recipe = yaml.safe_load(open("configs/smollm2_gsm8k_drafter.yaml"))
    recipe |= {"run_dir": str(tmp_path / "run"), "report_dir": str(tmp_path / "report"), "model": str(tmp_path / "tiny")}
    recipe["collect"] |= {"limit": 3, "max_new_tokens": 16, "batch_size": 2}
    recipe["train"]["optim"] |= {"max_steps": 3, "batch_size": 2}
    recipe["train"]["checkpoint"] |= {"every": 2, "asynchronous": False}
    recipe["train"]["log"] |= {"progress": False}
    recipe["evaluate"] |= {"limit": 2, "max_new_tokens": 12, "include_transformers": False}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run_pipeline(load_pipeline_config(path), say=[].append)

    methods = report["methods"]
    drafting = [name for name in methods if name.startswith("lossless-placeholder")]
    assert drafting == ["lossless-placeholder k=4 (cllm)", "lossless-placeholder k=4 + lookup (cllm)",
                        "lossless-placeholder k=3 groups=main + lookup (cllm)"]
    for name in drafting:
        m = methods[name]
        assert m["verifies_with_base"] and m["agreement"]["generations_equal"] == 2
        acceptance = m["acceptance"]
        candidates = {"committed", "drafter"} | ({"lookup"} if "lookup" in name else set())
        k = int(name.split("k=")[1][0])
        assert set(acceptance) == candidates and len(acceptance["drafter"]["by_position"]) == k
        assert acceptance["committed"]["mean_accepted"] >= acceptance["drafter"]["mean_accepted"]
    assert report["training"]["cllm"]["adapter"] and report["training"]["cllm"]["steps"] == 3
    assert (tmp_path / "report" / "acceptance.png").is_file()
    assert "Acceptance by draft position" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """A recipe a user runs is checked before it runs: every key known and in range, rows that resolve
    (a config that fails here would fail only after hours of collection and training)."""
    from cllm_jax.evaluate.ablation import load_ablation_config
    from cllm_jax.train.config import load_config

    raw = yaml.safe_load(path.read_text())
    if "pipeline" in raw:
        config = load_ablation_config(path)
    elif {"collect", "evaluate"} & set(raw) or "extends" in raw and "train" in raw:
        config = load_pipeline_config(path)
    else:
        config = load_config(path)
    if "run_dir" in raw:  # the file's own values win over what it extends
        assert str(config.run_dir) == raw["run_dir"]
