"""Drafters shipped with the package, loadable by name: `decode.py --draft-adapter smollm2-gsm8k`.

Each is a placeholder drafter (cllm_jax/decode/placeholder.py) in the PEFT layout of weights/peft.py,
stored in bfloat16 under cllm_jax/drafters/NAME/, beside `drafter.json`: the built-in base model it
drafts for, the training config, the digest of its training data and the figures measured with it.
A fresh clone decodes losslessly with one at once; a shipped drafter is replaced only by a better
measured one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cllm_jax.errors import CheckpointError
from cllm_jax.weights.peft import CONFIG_FILE, PLACEHOLDERS_FILE, WEIGHTS_FILE

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "drafters"
CARD_FILE = "drafter.json"
_FILES = (CONFIG_FILE, WEIGHTS_FILE, PLACEHOLDERS_FILE, CARD_FILE)


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()) if SHIPPED_DIR.is_dir() else []


def shipped_drafter(name: str) -> Path:
    """The directory of the shipped drafter `name`; a missing file is one line that names it."""
    path = SHIPPED_DIR / name
    if name not in shipped_names():
        raise CheckpointError(f"no shipped drafter is called {name!r} (shipped: {', '.join(shipped_names()) or 'none'})")
    for file in _FILES:
        if not (path / file).is_file():
            raise CheckpointError(f"the shipped drafter {name} lacks {path / file}: restore it (git checkout -- "
                                  f"{path}) or reinstall the package")
    return path


def card(name: str) -> dict:
    """drafter.json of a shipped drafter: base model, training config, data digest, measured figures."""
    path = shipped_drafter(name) / CARD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"cannot read {path} ({e}): the shipped drafter is damaged; restore it from git") from None


def drafter_for(model: str | None) -> str | None:
    """The name of the shipped drafter of a built-in model (None: the default model), if one ships."""
    base = model or "smollm2-135m"
    return next((name for name in shipped_names() if card(name).get("base_model") == base), None)
