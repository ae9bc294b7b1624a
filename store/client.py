"""Connecting to Redis and checking that it keeps what it acknowledges."""

from __future__ import annotations

import logging

import redis
import redis.asyncio as aredis

from core.config import Settings
from core.redis_server import EmbeddedRedis, ensure_redis

log = logging.getLogger("alignd.store")


def connect(url: str, *, decode: bool = True) -> redis.Redis:
    """A client with a connection pool; `decode` returns str instead of bytes."""
    return redis.Redis.from_url(
        url, decode_responses=decode, health_check_interval=30, socket_keepalive=True, retry_on_timeout=True
    )


def connect_async(url: str, *, max_connections: int, timeout_s: float) -> aredis.Redis:
    """The API's asyncio client. Its pool is bounded and *blocking*: a request that finds every connection busy waits
    up to `timeout_s` for one, instead of failing at once with "Too many connections" — which, answered as a Redis
    outage, made 300 concurrent clients look like one."""
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
    )
    return aredis.Redis(connection_pool=pool)


UNVERIFIED = "cannot read the Redis persistence settings (CONFIG GET refused); make sure AOF is on"


def durability_warnings(r: redis.Redis) -> list[str]:
    """Why this Redis could lose acknowledged writes (empty when AOF fsyncs every write and nothing is evicted)."""
    try:
        cfg = r.config_get("append*") | r.config_get("maxmemory-policy")
    except redis.ResponseError:  # managed Redis often forbids CONFIG; we cannot tell
        return [UNVERIFIED]
    problems = []
    policy = cfg.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":  # volatile-* too: idempotency records and rate counters carry TTLs, and matter
        problems.append(
            f"maxmemory-policy is {policy!r}: at maxmemory Redis evicts keys (the feedback log, the registry, "
            "idempotency records) without an error; set maxmemory-policy noeviction so a full Redis refuses writes"
        )
    if cfg.get("appendonly") != "yes":
        problems.append("appendonly is off: a Redis crash or restart loses every acknowledged feedback event")
    elif cfg.get("appendfsync") != "always":
        problems.append(
            f"appendfsync is {cfg.get('appendfsync')!r}: a crash can lose up to ~1 s of acknowledged"
            " feedback (set appendfsync always for the guarantee)"
        )
    return problems


def warn_if_not_durable(r: redis.Redis, *, production: bool = False) -> list[str]:
    """Log the durability problems; in production refuse (RuntimeError) a Redis that evicts or does not fsync every
    write. A Redis that forbids CONFIG cannot be checked: a warning only, the operator vouches for it."""
    problems = durability_warnings(r)
    for p in problems:
        log.warning("REDIS DURABILITY: %s", p)
    definite = [p for p in problems if p != UNVERIFIED]
    if production and definite:
        raise RuntimeError("refusing to run with ALIGND_ENV=production on this Redis: " + "; ".join(definite))
    return problems


def open_redis(settings: Settings) -> tuple[str, redis.Redis, EmbeddedRedis | None]:
    """(url, client, embedded server we started or None): `ALIGND_REDIS_URL`, else the embedded redis-server under
    `ALIGND_HOME`. Warns when an external Redis could lose acknowledged writes, and refuses it in production."""
    url, embedded = ensure_redis(settings.redis_url, settings.home, settings.embedded_redis_port)
    client = connect(url)
    if settings.redis_url:
        warn_if_not_durable(client, production=settings.env == "production")
    return url, client, embedded
