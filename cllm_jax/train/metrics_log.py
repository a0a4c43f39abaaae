"""Per-step training metrics: a JSONL file, TensorBoard when installed, and a tqdm progress bar.

`metrics.jsonl` holds one line per optimizer step: step, epoch, loss, loss_consistency, loss_ar
(unweighted), grad_norm, lr, consistency_tokens, ar_tokens (loss-bearing positions), tokens (all
tokens fed through the model), examples, step_time_s, tokens_per_s, and compile=true on the first
step of a process (its time includes compilation). On resume, lines after the restored step are
dropped first, so the file always reads as one uninterrupted run. TensorBoard's event files do
the same: a resumed writer purges the events after the restored step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line from a killed run
    return out


def _tensorboard_writer(log_dir: Path, start_step: int):
    purge = {"purge_step": start_step + 1} if start_step else {}  # events of steps > start were redone
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            return writer_cls(str(log_dir), **purge)
        except Exception:  # not installed, or torch without the tensorboard package
            continue
    return None


def peak_memory_gib() -> float:
    """The process's peak resident memory so far (host RAM: on a CPU, what training needs)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    def __init__(self, run_dir: Path, start_step: int, *, total: int, progress: bool = True,
                 tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        path = Path(run_dir) / METRICS_FILE
        kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= start_step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(m) + "\n" for m in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard", start_step)
        if progress:
            self.bar = tqdm(total=total, initial=start_step, unit="step", dynamic_ncols=True, desc="train")

    def write(self, step: int, metrics: dict, *, epoch: int, tokens: int, examples: int, seconds: float,
              first: bool = False) -> dict:
        record = {"step": step, "epoch": epoch, **metrics, "tokens": tokens, "examples": examples,
                  "step_time_s": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
                  "time": time.time(), "peak_memory_gib": peak_memory_gib()}
        if first:
            record["compile"] = True
        if not self.enabled:
            return record
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key in [k for k in metrics if k.startswith("loss")] + ["grad_norm", "lr", "tokens_per_s", "step_time_s"]:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        if self.bar is not None:
            # every loss term the objective reports, by its short name (loss_consistency -> consistency)
            terms = {k.removeprefix("loss_"): f"{v:.4f}" for k, v in metrics.items() if k.startswith("loss")}
            self.bar.set_postfix(**terms, tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)
        return record

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
