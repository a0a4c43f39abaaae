"""Models named by Hugging Face hub id (`org/name[@revision]`), resolved from the local hub cache only.

Nothing is downloaded at run time (the project's rule: no hub traffic from the tools): a hub id is
looked up with `snapshot_download(..., local_files_only=True)`, which follows the cache's `refs/`
and `snapshots/` exactly as transformers does, under $HF_HUB_CACHE or $HF_HOME/hub. A model that is
not there is one line saying what to download and where it will land.
"""

from __future__ import annotations

import re
from pathlib import Path

from cllm_jax.errors import CheckpointError

# org/name with an optional @revision (branch, tag or commit); a path with more parts is a path.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_id(arg: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) if `arg` has the form of a hub id, else None."""
    match = _HUB_ID.match(arg)
    if match is None or arg.endswith(".gguf"):
        return None
    return match["repo"], match["revision"]


def resolve_hub_id(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot directory of a cached hub model; CheckpointError naming the download otherwise."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        name = f"{repo_id}@{revision}" if revision else repo_id
        command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise CheckpointError(
            f"{name} is neither a local path nor a model in the Hugging Face cache ({constants.HF_HUB_CACHE}): "
            f"download it once with `{command}` (HF_HUB_CACHE or HF_HOME choose the cache), or pass a local "
            f"model directory"
        ) from None
