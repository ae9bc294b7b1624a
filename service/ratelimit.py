"""Fixed-window rate limits counted in Redis, shared by every API process (INCR + EXPIRE in one transaction)."""

from __future__ import annotations

import time

import redis.asyncio as aredis

from service.errors import APIError
from store import keys


async def enforce(r: aredis.Redis, kind: str, subject: str, limit: int, window_s: int, what: str) -> None:
    """Raise 429 when `subject` has used `limit` `kind` requests in the current window of `window_s` seconds."""
    window = int(time.time() // window_s)
    key = keys.rate(kind, subject, f"{window_s}:{window}")
    pipe = r.pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, window_s + 1)
    count, _ = await pipe.execute()
    if count > limit:
        retry = int(window_s - time.time() % window_s) + 1
        raise APIError(
            429,
            f"rate limit exceeded: at most {limit} {what}; retry in {retry} s",
            "rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
