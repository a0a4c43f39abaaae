"""The ablation runner on a tiny model: a row runs the pipeline on the shared collection, a finished
row is skipped without loading anything, and the table is built from the finished rows only."""

import json
import os

import pytest
import yaml

from cllm_jax.errors import ConfigError
from cllm_jax.evaluate.ablation import load_ablation_config, run_ablation, summarise_row
from tests.tiny import save_tiny_chat_model


def _ablation(tmp_path):
    save_tiny_chat_model(tmp_path / "tiny")
    recipe = yaml.safe_load(open("configs/smollm2_gsm8k.yaml"))
    recipe |= {"model": str(tmp_path / "tiny")}
    recipe["collect"] |= {"limit": 2, "block_size": 4, "max_new_tokens": 8, "clean": False}
    recipe["train"]["checkpoint"] |= {"asynchronous": False}
    recipe["train"]["log"] |= {"progress": False}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ablation = {
        "pipeline": str(tmp_path / "recipe.yaml"),
        "run_dir": str(tmp_path / "runs"),
        "report_dir": str(tmp_path / "reports"),
        "budget": ["train.optim.max_steps=2", "evaluate.limit=2", "evaluate.max_new_tokens=8",
                   "evaluate.block_sizes=[2,4]", "evaluate.include_transformers=false"],
        "rows": {"reference": [], "high_lr": ["train.optim.lr=1e-2"]},
    }
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(ablation))
    return load_ablation_config(tmp_path / "ablation.yaml")


def test_a_row_runs_on_the_shared_collection_and_is_skipped_once_reported(tmp_path):
    ablation = _ablation(tmp_path)
    messages = []
    table = run_ablation(ablation, ["reference"], say=messages.append)

    link = tmp_path / "runs" / "reference" / "trajectories"
    assert link.is_symlink() and os.path.realpath(link) == str((tmp_path / "runs" / "trajectories").resolve())
    assert (tmp_path / "runs" / "trajectories" / "trajectories.jsonl").stat().st_size > 0
    assert table["high_lr"] is None
    row = table["reference"]
    assert set(row["tpf"]) == {"fixed", "rolling", "multiblock", "mb + recycling"}
    assert all(v > 0 for v in row["tpf"].values())
    assert set(row["speed"]) == {"2", "4"} and row["block_size"] == 4
    assert row["train_minutes"] > 0 and 0 < row["base_nll_ratio"]
    report = (tmp_path / "reports" / "report.md").read_text()
    assert "| reference |" in report and "| high_lr | not run" in report
    assert json.loads((tmp_path / "reports" / "report.json").read_text())["reference"] == row
    assert (tmp_path / "reports" / "tpf.png").is_file()

    again = []
    run_ablation(ablation, ["reference"], say=again.append)
    assert again == [f"== reference: done ({tmp_path / 'reports' / 'rows' / 'reference'})"]


def test_unknown_rows_and_keys_are_one_line_errors(tmp_path):
    ablation = _ablation(tmp_path)
    with pytest.raises(ConfigError, match="no row 'missing'"):
        run_ablation(ablation, ["missing"])
    (tmp_path / "bad.yaml").write_text("pipeline: x.yaml\nrowz: {}\n")
    with pytest.raises(ConfigError, match="unknown key rowz"):
        load_ablation_config(tmp_path / "bad.yaml")


def test_a_row_is_summarised_from_the_fastest_cllm_method():
    def method(tpf, speed, n, acc=0.5):
        return {"tpf": tpf, "tokens_per_second": speed, "speedup": speed / 10, "accuracy": acc,
                "agreement": {"final_answer": 0.75, "generation": 0.0}, "base_nll_ratio": 1.05, "block_size": n}

    report = {"methods": {
        "ar (base)": method(1.0, 10.0, None),
        "jacobi (cllm) n=8": method(1.5, 9.0, 8), "jacobi-rolling (cllm) n=8": method(1.8, 12.0, 8, acc=0.25),
        "jacobi-multiblock (cllm) n=8": method(1.9, 11.0, 8),
        "jacobi-multiblock + recycling (cllm) n=8": method(2.0, 10.5, 8),
        "jacobi (cllm) n=16": method(1.6, 7.0, 16), "jacobi-rolling (cllm) n=16": method(2.1, 8.0, 16),
        "jacobi-multiblock (cllm) n=16": method(2.2, 8.5, 16),
        "jacobi-multiblock + recycling (cllm) n=16": method(2.4, 8.2, 16),
    }}
    row = summarise_row(report, [{"step_time_s": 30.0}, {"step_time_s": 90.0}])
    assert row["tpf"] == {"fixed": 1.6, "rolling": 2.1, "multiblock": 2.2, "mb + recycling": 2.4}
    assert row["speed"] == {"8": {"tokens_per_second": 12.0, "speedup": 1.2},
                            "16": {"tokens_per_second": 8.5, "speedup": 0.85}}
    assert row["accuracy"] == 0.25 and row["agreement"] == 0.75 and row["train_minutes"] == 2.0
