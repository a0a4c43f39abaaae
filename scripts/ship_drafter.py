"""Ship a trained placeholder drafter with the package: cllm_jax/drafters/NAME/ (bf16) and drafter.json.

    python scripts/ship_drafter.py --run runs/smollm2_gsm8k_drafter --name smollm2-gsm8k \
        --report reports/smollm2_gsm8k_drafter

drafter.json records the built-in base model it drafts for, the training config, the digest of the
training data (the collection's records file), the training cost, and the figures the report measured
with it, so a shipped drafter says where it came from. Replace a shipped drafter only with a better
measured one: the repository should grow by a few files, not one per experiment.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cllm_jax.weights.drafters import CARD_FILE, SHIPPED_DIR  # noqa: E402
from cllm_jax.weights.load import load_model, resolve_adapter  # noqa: E402
from cllm_jax.weights.peft import load_adapter, save_adapter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the pipeline run directory that trained the drafter")
    parser.add_argument("--name", required=True, help="the name it loads by (--draft-adapter NAME)")
    parser.add_argument("--report", required=True, help="the report directory measured with it")
    parser.add_argument("--base", default="smollm2-135m", help="the built-in model it drafts for")
    args = parser.parse_args()
    run, report = Path(args.run), Path(args.report)

    loaded = load_model(args.base)
    load_adapter(loaded.model, resolve_adapter(run))
    out = SHIPPED_DIR / args.name
    if out.exists():
        shutil.rmtree(out)
    save_adapter(loaded.model, out, args.base, extra={"shipped": args.name}, dtype="bfloat16")
    records = run / "trajectories" / "trajectories.jsonl"
    metrics = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    figures = json.loads((report / "report.json").read_text())
    drafting = {name: {k: m[k] for k in ("tpf", "tokens_per_second", "speedup", "agreement", "acceptance")}
                for name, m in figures["methods"].items() if name.startswith("lossless-placeholder")}
    card = {
        "name": args.name,
        "base_model": args.base,
        "kind": "placeholder drafter (decode with --method lossless-placeholder)",
        "training_config": yaml.safe_load((run / "train" / "config.yaml").read_text()),
        "training_data": {"records": str(records), "blake2b": hashlib.blake2b(records.read_bytes(), digest_size=16)
                          .hexdigest(), "prompts": sum(1 for _ in records.open())},
        "training": {"steps": metrics[-1]["step"], "minutes": sum(m["step_time_s"] for m in metrics) / 60,
                     "final_metrics": {k: v for k, v in metrics[-1].items() if k.startswith("loss")}},
        "measured": {"report": str(report), "machine": figures["machine"], "held_out_prompts":
                     figures["held_out_prompts"], "rows": drafting, "training": figures.get("training")},
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"shipped {args.name} -> {out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
