"""A large file as parts of bounded size, joined and checked by SHA-256 on the other side.

For machines that receive a bounded working tree per call (a GPU machine taking at most 64 MiB per
run): `split_file` writes NAME.part00, NAME.part01, ... and NAME.manifest.json (the size and hash of
the whole file and of every part); the parts travel in separate calls and accumulate there;
`join_parts` checks every part, joins them, checks the whole, and only then puts the file in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cllm_jax.errors import CheckpointError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def manifest_path(directory: str | os.PathLike, name: str) -> Path:
    return Path(directory) / f"{name}.manifest.json"


def split_file(path: str | os.PathLike, out_dir: str | os.PathLike, part_bytes: int) -> Path:
    """Write `path` as parts of at most `part_bytes` into out_dir, with its manifest; returns the manifest."""
    path, out_dir = Path(path), Path(out_dir)
    if part_bytes < 1:
        raise CheckpointError(f"part size must be at least 1 byte, got {part_bytes}")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, whole = [], hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(part_bytes):
            whole.update(data)
            part = out_dir / f"{path.name}.part{len(parts):02d}"
            part.write_bytes(data)
            parts.append({"file": part.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"name": path.name, "size": sum(p["size"] for p in parts), "sha256": whole.hexdigest(), "parts": parts}
    out = manifest_path(out_dir, path.name)
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def join_parts(manifest: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Check and join the parts beside `manifest` into out_path (atomically); returns out_path.

    A file already at out_path with the manifest's hash is kept as is. Missing or damaged parts raise
    CheckpointError naming them; nothing is written then.
    """
    manifest, out_path = Path(manifest), Path(out_path)
    spec = json.loads(manifest.read_text())
    if out_path.is_file() and out_path.stat().st_size == spec["size"] and sha256_file(out_path) == spec["sha256"]:
        return out_path
    directory = manifest.parent
    missing = [p["file"] for p in spec["parts"] if not (directory / p["file"]).is_file()]
    if missing:
        raise CheckpointError(f"{len(missing)} of {len(spec['parts'])} parts of {spec['name']} are missing in "
                              f"{directory}: {', '.join(missing)}; copy them there (one transfer each) and rejoin")
    bad = [p["file"] for p in spec["parts"] if sha256_file(directory / p["file"]) != p["sha256"]]
    if bad:
        raise CheckpointError(f"parts of {spec['name']} fail their SHA-256 check: {', '.join(bad)}; "
                              f"copy them again from the source and rejoin")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".joining")
    whole = hashlib.sha256()
    with open(tmp, "wb") as out:
        for p in spec["parts"]:
            data = (directory / p["file"]).read_bytes()
            whole.update(data)
            out.write(data)
    if whole.hexdigest() != spec["sha256"]:
        tmp.unlink()
        raise CheckpointError(f"the joined {spec['name']} fails its SHA-256 check although every part passes: "
                              f"the manifest is inconsistent; split the file again")
    os.replace(tmp, out_path)
    return out_path
