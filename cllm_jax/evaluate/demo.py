"""What `make demo` (decode.py demo) shows: which model, and a plain closing statement of the result."""

from __future__ import annotations

import json
from pathlib import Path

from cllm_jax.weights.load import RUN_EXPORT_DIR, resolve_model

_SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
CPU_RECIPE_TIME = "about 2 h 15 min on the 2-core CPU it was measured on"  # README: configs/smollm2_gsm8k_jf.yaml


def _shape(config_file: Path) -> tuple:
    config = json.loads(config_file.read_text(encoding="utf-8"))
    return tuple(config.get(k) for k in _SHAPE)


def newest_cllm(runs: str | Path = "runs", base: str | None = None) -> Path | None:
    """The most recently exported model under `runs` (a pipeline's train/export or a run's export) that
    has the base model's architecture, i.e. a CLLM trained from it; None when there is none."""
    runs = Path(runs)
    exports = [*runs.glob(f"*/train/{RUN_EXPORT_DIR}/config.json"), *runs.glob(f"*/{RUN_EXPORT_DIR}/config.json")]
    if not exports:
        return None
    shape = _shape(resolve_model(base) / "config.json")
    matching = [f for f in exports if _shape(f) == shape]
    return max(matching, key=lambda f: f.stat().st_mtime).parent if matching else None


def closing_statement(cllm: Path | None, jacobi: dict, ar: dict, prompts: int, block_size: int = 8) -> str:
    """What was shown and the next command, from the two runs' summaries (engine.summarize) of rolling
    Jacobi with lookup guesses (the fastest exact method on a CPU) and AR."""
    tpf = jacobi["tokens_per_forward"]
    speedup = jacobi["tokens_per_second"] / max(ar["tokens_per_second"], 1e-9)
    # What one Jacobi pass costs in AR passes on this machine: Jacobi is faster exactly when TPF exceeds it.
    cost = (jacobi["seconds"] / max(jacobi["forward_passes"], 1)) / max(ar["seconds"] / max(ar["forward_passes"], 1), 1e-9)
    machine = (f"on this machine one {block_size}-token pass costs {cost:.1f} one-token passes (Jacobi pays only "
               f"above TPF {cost:.1f})")  # fmt: skip
    if cllm is None:
        return (f"Shown: the untrained base model on {prompts} held-out GSM8K questions, rolling Jacobi with lookup "
                f"guesses against AR: TPF {tpf:.2f}, {machine}, so it ran at {speedup:.2f}x AR's speed. Jacobi alone "
                f"barely helps an ordinary model (TPF about 1.06); the lookup guesses give this, and consistency "
                f"training raises it further: train a CLLM with `make cllm` ({CPU_RECIPE_TIME}; the GPU recipe when "
                f"JAX sees a GPU), then rerun `make demo`.")  # fmt: skip
    return (f"Shown: the CLLM {cllm} (consistency-trained SmolLM2) on {prompts} held-out GSM8K questions: rolling "
            f"Jacobi with lookup guesses makes {tpf:.2f} tokens per forward pass against 1.00 for AR on the same "
            f"weights, and ran at {speedup:.2f}x AR's speed; {machine}; on a GPU a block pass costs about one "
            f"token's. Next: chat with it, `.venv/bin/python decode.py chat --model {cllm}`.")  # fmt: skip
