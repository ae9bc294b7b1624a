"""Checkpoint folders: a standard Hugging Face folder (safetensors + config + tokenizer) plus `manifest.json`.

The manifest lists every other file with its sha256 (never itself: it is written after the hashes), and carries
provenance (parent version, reward-model version, the feedback it was trained on and by whom) and evaluation metrics.
A folder copied from another deployment's checkpoint brings that deployment's manifest along: the writer keeps it
under `carried_from` (its provenance, without its file list) and writes its own. A checkpoint is written to a
temporary directory, fsynced, then renamed into place, so a reader never sees a partial one; `verify_checkpoint`
refuses any folder whose files do not match their hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """The folder is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(save_fn, dest: Path, manifest: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: `save_fn(tmpdir)` writes the files, then hash, fsync and rename to `dest`.

    `save_fn` is usually `lambda d: (model.save_pretrained(d), tokenizer.save_pretrained(d))`; when it copies a
    checkpoint folder of another deployment, that folder's manifest becomes `carried_from` in the new one.
    """
    dest = Path(dest)
    if dest.exists():
        raise CheckpointError(f"{dest} already exists; versions are immutable")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        save_fn(tmp)
        carried = _carried_manifest(tmp)  # removed from tmp: the manifest is written after the hashes
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        body = {
            **manifest,
            **({"carried_from": carried} if carried else {}),
            "files": files,
            "written_at": time.time(),
        }
        (tmp / MANIFEST).write_text(json.dumps(body, indent=2, sort_keys=True))
        _fsync_tree(tmp)
        os.rename(tmp, dest)  # atomic on one filesystem: the version appears whole or not at all
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _carried_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest `save_fn` copied in with another checkpoint, without its file list (the new one lists the files),
    and removed so it is neither hashed nor mistaken for this checkpoint's own."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        carried = json.loads(path.read_text())
    except json.JSONDecodeError:
        carried = {"unreadable_manifest": True}
    path.unlink()
    return {k: v for k, v in carried.items() if k != "files"} if isinstance(carried, dict) else {"manifest": carried}


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no {MANIFEST}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: {MANIFEST} is not valid JSON: {exc}") from exc


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The manifest, after checking every listed file's sha256; raises CheckpointError naming the first bad file."""
    path = Path(path)
    manifest = read_manifest(path)
    # older writers listed a carried manifest.json, hashed before they overwrote it: no manifest can hash itself
    files = {name: digest for name, digest in (manifest.get("files") or {}).items() if name != MANIFEST}
    if not files:
        raise CheckpointError(f"{path}: manifest lists no files")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        actual = sha256_file(f)
        if actual != digest:
            raise CheckpointError(f"{path}: {name} has sha256 {actual[:12]}…, manifest says {digest[:12]}…")
    return manifest
