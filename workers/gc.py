"""Checkpoint garbage collection (`alignd gc`): delete old policy (`vN`) and reward-model (`rm-vN`) folders and
orphaned temporary folders, never anything that is or may soon be needed.

Kept, whatever their age:
- the current policy version, its parent (the arena opponent and the first rollback target), every SFT or
  registered base version (`source` sft/base: what adapters and the gate's reference are built on), versions marked
  `pinned` in the registry, and every version an API process reported holding within the last
  `store.registry.SERVING_TTL_S` seconds (the followers' heartbeat: current, arena parent, still draining);
- the base folder of every kept LoRA adapter version;
- the current reward model;
- the newest `keep` versions of each kind (rollback room).
Deleted: the other registered versions' folders (the registry entry stays, marked `gc_deleted`, so history and
lineage still read; a rollback to one is refused by the loader as a missing checkpoint), and `.tmp-*` folders older
than `tmp_age_s` (a write killed half-way; a younger one may be a write in progress).

After each published version the cycle runs `after_publish`: the same collection with `ALIGND_GC_KEEP` as `keep`
(0: never automatic). A failure there is logged and never fails the cycle: the version is already published.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core.config import Settings
from store import registry
from training.lora import adapter_base

log = logging.getLogger("alignd.gc")


@dataclass
class GcPlan:
    keep: dict[str, str] = field(default_factory=dict)  # folder → why it stays
    delete: list[Path] = field(default_factory=list)
    deleted_versions: list[int] = field(default_factory=list)
    bytes: int = 0  # what deleting frees
    refused: dict[str, str] = field(default_factory=dict)  # registry path leading out of the root → why: untouched

    def as_dict(self) -> dict:
        return {
            "keep": self.keep,
            "delete": [str(p) for p in self.delete],
            "bytes": self.bytes,
            "deleted_versions": self.deleted_versions,
            "refused": self.refused,
        }

    def folder(self, settings: Settings, stored: str) -> Path | None:
        """The folder of a registry path, or None (recorded in `refused`) when it leads out of the checkpoint root:
        a hand-edited registry must not make gc keep-list or delete a folder elsewhere."""
        try:
            return settings.checkpoint(stored)
        except ValueError as exc:
            self.refused[str(stored)] = str(exc)
            return None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _policy_keep(r: redis.Redis, metas: list[dict], keep: int) -> dict[int, str]:
    current = registry.current_version(r)
    why: dict[int, str] = {}
    if current is not None:
        why[current] = "current"
        parent = (registry.get_version(r, current) or {}).get("parent")
        if parent is not None:
            why.setdefault(int(parent), "parent of the current version")
    for m in metas:
        if m.get("source") in ("sft", "base"):
            why.setdefault(m["version"], f"{m['source']} version")
        if m.get("pinned"):
            why.setdefault(m["version"], "pinned")
    for who, versions in registry.serving(r).items():
        for v in versions:
            why.setdefault(int(v), f"served by {who}")
    for m in metas[-keep:] if keep else []:
        why.setdefault(m["version"], f"among the newest {keep}")
    return why


def plan(r: redis.Redis, settings: Settings, *, keep: int = 5, tmp_age_s: float = 3600) -> GcPlan:
    """What `collect` would delete and what it keeps (and why), without touching anything."""
    out = GcPlan()
    metas = registry.list_versions(r)
    kept = _policy_keep(r, metas, keep)
    for m in metas:
        if not m.get("path") or m.get("gc_deleted"):
            continue
        folder = out.folder(settings, m["path"])
        if folder is not None and m["version"] in kept:
            out.keep[str(folder)] = kept[m["version"]]
            base = (adapter_base(folder) or {}).get("base") if folder.is_dir() else None
            if base and (base_folder := out.folder(settings, base)) is not None:
                out.keep[str(base_folder)] = f"base of kept adapter v{m['version']}"
    rewards = registry.list_reward_versions(r)
    current_rm = registry.current_reward_version(r)
    for m in rewards:
        if m.get("path") and (m["version"] == current_rm or m in rewards[-keep:]):
            if (folder := out.folder(settings, m["path"])) is None:
                continue
            out.keep[str(folder)] = (
                "current reward model" if m["version"] == current_rm else (f"among the newest {keep} reward models")
            )
    root = settings.checkpoints_dir.resolve()
    for m in metas + rewards:
        if not m.get("path") or m.get("gc_deleted"):
            continue
        folder = out.folder(settings, m["path"])
        folder = folder.resolve() if folder is not None else None
        if folder is None or str(folder) in out.keep or folder.parent != root or not folder.is_dir():
            continue  # kept, outside the root (never ours to delete) or already gone
        out.delete.append(folder)
        if m in metas:
            out.deleted_versions.append(m["version"])
    now = time.time()
    for tmp in root.glob(".tmp-*") if root.is_dir() else []:
        if tmp.is_dir() and now - tmp.stat().st_mtime > tmp_age_s:
            out.delete.append(tmp)
    out.bytes = sum(_size(p) for p in out.delete)
    return out


def collect(r: redis.Redis, settings: Settings, *, keep: int = 5, tmp_age_s: float = 3600) -> GcPlan:
    """Delete what `plan` lists; each deleted policy version is marked `gc_deleted` in the registry first."""
    todo = plan(r, settings, keep=keep, tmp_age_s=tmp_age_s)
    for v in todo.deleted_versions:
        registry.update_version(r, v, gc_deleted=time.time())
    for folder in todo.delete:
        shutil.rmtree(folder, ignore_errors=True)
    return todo


def after_publish(r: redis.Redis, settings: Settings) -> dict | None:
    """The automatic collection after a publish (`Settings.gc_keep`; 0: none): what it freed, or None when it did
    not run or failed (logged: a full disk or a registry hiccup must not turn a published cycle into a failed one)."""
    if settings.gc_keep <= 0:
        return None
    try:
        done = collect(r, settings, keep=settings.gc_keep)
    except Exception:
        log.exception("automatic checkpoint GC (keep %d) failed; the cycle goes on", settings.gc_keep)
        return None
    if done.delete:
        log.info("checkpoint GC freed %d bytes: %s", done.bytes, ", ".join(str(p) for p in done.delete))
    return {"keep": settings.gc_keep, "deleted_versions": done.deleted_versions, "bytes": done.bytes}
