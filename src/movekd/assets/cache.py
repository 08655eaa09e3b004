"""The asset cache: where converted models and data live, atomic writes, and the manifest.

Everything converted from the weight-carrying packages goes into ``MOVEKD_CACHE`` (default
``~/.cache/movekd``), never into the repository. Each asset is a folder that is built in a temporary
sibling and renamed into place only when complete, so an interrupted conversion never leaves a
half-written asset behind. A folder is complete when it holds ``manifest.json`` (file, size, sha256).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from movekd.atomic import atomic_folder as building
from movekd.atomic import atomic_write_text

MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """Root of the asset cache: ``$MOVEKD_CACHE`` or ``~/.cache/movekd``."""
    root = os.environ.get("MOVEKD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "movekd")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, extra: dict | None = None) -> dict:
    """Record every file under ``folder`` (relative path, size, sha256) in ``manifest.json``.

    Image folders with thousands of files are summarised (count and total size) rather than hashed
    one by one, so the manifest stays small; the JSON files that index them are hashed.
    """
    files = []
    summarised: dict[str, dict] = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MANIFEST:
            continue
        rel = path.relative_to(folder).as_posix()
        if "/" in rel and path.suffix.lower() in {".png", ".jpg", ".jpeg"}:
            top = rel.split("/", 1)[0]
            entry = summarised.setdefault(top, {"files": 0, "bytes": 0})
            entry["files"] += 1
            entry["bytes"] += path.stat().st_size
            continue
        files.append({"file": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    manifest = {"files": files, "folders": summarised, **(extra or {})}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
