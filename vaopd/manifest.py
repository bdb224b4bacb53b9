"""Checkpoint manifests: the size and SHA-256 of every file of a checkpoint folder.

``manifest.json`` holds ``{"version": 1, "files": {"model/model.safetensors": {"size": N, "sha256": "..."}}}``
for every regular file of the folder (paths relative to it, ``/``-separated). It is written last,
into the hidden temporary folder, before that folder is renamed into place, so a published
checkpoint always has one that describes it. ``verify_manifest`` checks it before anything is loaded.

This detects damage (truncation, a flipped byte, a missing file), not tampering: whoever can write
the folder can rewrite the manifest too.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["MANIFEST", "CheckpointError", "write_manifest", "verify_manifest"]

MANIFEST = "manifest.json"
_BLOCK = 8 << 20


class CheckpointError(ValueError):
    """A damaged, incomplete or refused checkpoint; the message names the file at fault."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large blocks: a few threads read and hash files in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(folder / n), names)))


def write_manifest(folder: Path) -> dict:
    """Hash every file under ``folder`` and write ``folder/manifest.json`` (fsynced); returns it."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    digests = _hash_all(folder, names)
    manifest = {"version": 1, "files": {n: {"size": (folder / n).stat().st_size, "sha256": digests[n]} for n in names}}
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify_manifest(folder: Path) -> None:
    """Raise ``CheckpointError`` naming the first missing, resized or changed file of ``folder``.

    Sizes are checked first (cheap: a truncated file fails without reading anything), then hashes.
    Files that are not in the manifest are ignored.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = {str(name): (int(e["size"]), str(e["sha256"])) for name, e in files.items()}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the save did not finish, or an older vaopd wrote it)") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, _) in entries.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        if file.stat().st_size != size:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, {MANIFEST} says {size} (truncated or replaced)")
    try:
        digests = _hash_all(folder, sorted(entries))
    except OSError as e:
        raise CheckpointError(f"{e.filename}: unreadable ({e.strerror})") from None
    bad = [name for name in sorted(entries) if digests[name] != entries[name][1]]
    if bad:
        raise CheckpointError(f"{folder / bad[0]}: SHA-256 differs from {MANIFEST} (the file is corrupt)"
                              + (f"; also {', '.join(bad[1:])}" if len(bad) > 1 else ""))
