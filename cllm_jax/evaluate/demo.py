"""What `make demo` (decode.py demo) shows: which model, and a plain closing statement of the result.

The newest trained CLLM under runs/ decides: an adapter run (train.adapter) is shown lossless (the
base model verifies what the adapter drafts, so the text is the base model's), a fully fine-tuned
one as the lossy CLLM it is; with neither, the base model with lookup guesses alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from cllm_jax.weights.load import RUN_EXPORT_DIR, resolve_model
from cllm_jax.weights.peft import is_adapter_dir

_SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def _shape(config_file: Path) -> tuple:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return tuple(config.get(k) for k in _SHAPE)


def _exports(runs: Path) -> list[Path]:
    found = [*runs.glob(f"*/train/{RUN_EXPORT_DIR}"), *runs.glob(f"*/{RUN_EXPORT_DIR}")]
    return [p for p in found if (p / "config.json").is_file() or is_adapter_dir(p)]


def _is_trained_from(export: Path, base: str | None, shape: tuple) -> bool:
    if is_adapter_dir(export) and not (export / "config.json").is_file():
        # only the base's name is read here: a damaged adapter is refused when it loads, not when it is listed
        named = json.loads((export / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
        return named in (base, None) or (base is None and named == "smollm2-135m")
    return _shape(export / "config.json") == shape


def newest_cllm(runs: str | Path = "runs", base: str | None = None) -> Path | None:
    """The most recently exported CLLM under `runs` (a pipeline's train/export or a run's export:
    a model of the base model's architecture, or an adapter of that base); None when there is none."""
    exports = _exports(Path(runs))
    if not exports:
        return None
    shape = _shape(resolve_model(base) / "config.json")
    matching = [e for e in exports if _is_trained_from(e, base, shape)]
    def written(export: Path) -> float:  # an export's config file is written when the export is complete
        return next((export / f).stat().st_mtime for f in ("config.json", "adapter_config.json") if (export / f).is_file())

    return max(matching, key=written) if matching else None


def closing_statement(cllm: Path | None, jacobi: dict, ar: dict, prompts: int, block_size: int = 8,
                      lossless: bool = False, identical: int | None = None, shipped: str | None = None) -> str:
    """What was shown and the next command, from the two runs' summaries (engine.summarize) of the
    Jacobi (or drafting) method and AR; `identical`: how many answers equal AR's (lossless); `shipped`:
    the shipped drafter that drafted (weights/drafters.py)."""
    tpf = jacobi["tokens_per_forward"]
    speedup = jacobi["tokens_per_second"] / max(ar["tokens_per_second"], 1e-9)
    # What one Jacobi pass costs in AR passes on this machine: Jacobi is faster exactly when TPF exceeds it.
    cost = (jacobi["seconds"] / max(jacobi["forward_passes"], 1)) / max(ar["seconds"] / max(ar["forward_passes"], 1), 1e-9)
    machine = (f"on this machine one {block_size}-token pass costs {cost:.1f} one-token passes (Jacobi pays only "
               f"above TPF {cost:.1f})")  # fmt: skip
    if shipped:
        return (f"Shown: lossless decoding with the shipped placeholder drafter {shipped} on {prompts} held-out GSM8K "
                f"questions: it drafts k tokens per pass, the base model verifies them in the same pass, so the text "
                f"is the base model's own ({identical} of {prompts} answers identical to AR's, token for token); "
                f"{tpf:.2f} tokens per forward pass against 1.00 for AR, {speedup:.2f}x AR's speed. Next: chat with it, "
                f"`.venv/bin/python decode.py chat --draft-adapter {shipped}`, or train your own with `make cllm`.")
    if cllm is None:
        return (f"Shown: the untrained base model on {prompts} held-out GSM8K questions, rolling Jacobi with lookup "
                f"guesses against AR: TPF {tpf:.2f}, {machine}, so it ran at {speedup:.2f}x AR's speed. Jacobi alone "
                f"barely helps an ordinary model (TPF about 1.06); the lookup guesses give this, and a consistency-"
                f"trained drafter raises it further: train one with `make cllm` (the README gives its time; the "
                f"GPU recipe when JAX sees a GPU), then rerun `make demo`.")  # fmt: skip
    if lossless:
        return (f"Shown: lossless decoding with the adapter {cllm} on {prompts} held-out GSM8K questions: it drafts, "
                f"the base model verifies in the same pass, so the text is the base model's own ({identical} of "
                f"{prompts} answers identical to AR's, token for token); {tpf:.2f} tokens per forward pass against "
                f"1.00 for AR, {speedup:.2f}x AR's speed; {machine}; two rows per pass, on a GPU about the cost of "
                f"one. Next: chat with it, `.venv/bin/python decode.py chat --model {cllm}`.")  # fmt: skip
    return (f"Shown: the CLLM {cllm} (consistency-trained SmolLM2, its own text) on {prompts} held-out GSM8K "
            f"questions: rolling Jacobi with lookup guesses makes {tpf:.2f} tokens per forward pass against 1.00 "
            f"for AR on the same weights, and ran at {speedup:.2f}x AR's speed; {machine}; on a GPU a block pass "
            f"costs about one token's. Next: chat with it, `.venv/bin/python decode.py chat --model {cllm}`.")
