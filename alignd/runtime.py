"""Glue shared by the CLI and the workers: resolving Redis and publishing a checkpoint as a registry version."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import redis

from alignd.config import Settings
from alignd.redis_server import EmbeddedRedis, ensure_redis
from store import registry
from store.client import connect, warn_if_not_durable
from training.checkpoint import write_checkpoint

log = logging.getLogger("alignd")


def open_redis(settings: Settings) -> tuple[str, redis.Redis, EmbeddedRedis | None]:
    """(url, client, embedded server we started or None). Warns when the Redis could lose acknowledged writes."""
    url, embedded = ensure_redis(settings.redis_url, settings.home, settings.embedded_redis_port)
    client = connect(url)
    if settings.redis_url:
        warn_if_not_durable(client)
    return url, client, embedded


def checkpoint_path(settings: Settings, version: int) -> Path:
    return settings.checkpoints_dir / f"v{version}"


def publish_version(r: redis.Redis, settings: Settings, save_fn, meta: dict[str, Any], *,
                    expected_current: int | None | str = "any", fencing_token: int | None = None) -> int:
    """Write a checkpoint (atomic, sha256 manifest), register it, and make it current by compare-and-set.

    `meta` carries provenance and metrics: parent, reward_version, feedback, annotators, metrics, source.
    """
    version = registry.allocate_version(r)
    path = checkpoint_path(settings, version)
    write_checkpoint(save_fn, path, {**meta, "version": version})
    registry.add_version(r, version, {**meta, "path": str(path), "created": time.time()})
    registry.set_current(r, version, expected=expected_current, fencing_token=fencing_token,
                         detail={"parent": meta.get("parent")})
    return version
