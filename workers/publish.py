"""Publishing a checkpoint as a registry version: used by the cycle, `alignd bootstrap` and `alignd train sft`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from core.config import Settings
from store import registry
from training.checkpoint import write_checkpoint


def checkpoint_path(settings: Settings, version: int) -> Path:
    return settings.checkpoints_dir / f"v{version}"


def publish_version(
    r: redis.Redis,
    settings: Settings,
    save_fn,
    meta: dict[str, Any],
    *,
    expected_current: int | None | str = "any",
    fencing_token: int | None = None,
) -> int:
    """Write a checkpoint (atomic, sha256 manifest), register it, and make it current by compare-and-set.

    `meta` carries provenance and metrics: parent, reward_version, feedback, annotators, metrics, source.
    """
    version = registry.allocate_version(r)
    path = checkpoint_path(settings, version)
    write_checkpoint(save_fn, path, {**meta, "version": version})
    registry.add_version(r, version, {**meta, "path": settings.stored_path(path), "created": time.time()})
    registry.set_current(
        r, version, expected=expected_current, fencing_token=fencing_token, detail={"parent": meta.get("parent")}
    )
    return version
