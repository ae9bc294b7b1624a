"""Fixed-window rate limits counted in Redis, shared by every API process.

`charge` checks several budgets at once — per person (key, `user`) and per key, in requests and in tokens — in one
Lua script: every counter is checked before any is incremented, so a refused request uses up nothing and no request
is admitted over any of its budgets, whatever the `user` values a key rotates through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aredis

from core.config import Settings
from service.auth import Caller
from service.errors import APIError
from store import keys

# KEYS: the counters; ARGV: per counter (amount, limit, ttl). Returns 0, or the 1-based index of the first budget
# the request would overrun.
CHARGE_LUA = """
for i, key in ipairs(KEYS) do
  local amount, limit = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  if tonumber(redis.call('GET', key) or '0') + amount > limit then return i end
end
for i, key in ipairs(KEYS) do
  if redis.call('INCRBY', key, ARGV[3 * i - 2]) == tonumber(ARGV[3 * i - 2]) then
    redis.call('EXPIRE', key, ARGV[3 * i])
  end
end
return 0
"""


@dataclass(frozen=True)
class Budget:
    kind: str  # e.g. "chat", "chat-key", "tokens-key"
    subject: str  # who it belongs to: an annotator id or a key's user id
    amount: int  # what this request costs
    limit: int  # per window
    what: str  # for the message: "chat requests per minute for this key"
    window_s: int = 60


async def charge(r: aredis.Redis, budgets: list[Budget], now: float | None = None) -> None:
    """Count the request against every budget, or raise 429 (changing nothing) naming the first it would overrun."""
    now = time.time() if now is None else now
    counters = [keys.rate(b.kind, b.subject, f"{b.window_s}:{int(now // b.window_s)}") for b in budgets]
    args = [x for b in budgets for x in (b.amount, b.limit, b.window_s + 1)]
    over = int(await r.eval(CHARGE_LUA, len(counters), *counters, *args))
    if over:
        b = budgets[over - 1]
        retry = int(b.window_s - now % b.window_s) + 1
        if b.amount > b.limit:  # could never fit: waiting would not help
            raise APIError(
                429, f"this request costs {b.amount} but the limit is {b.limit} {b.what}", "rate_limit_exceeded"
            )
        raise APIError(
            429,
            f"rate limit exceeded: at most {b.limit} {b.what}; retry in {retry} s",
            "rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )


def chat_budgets(settings: Settings, caller: Caller, person: str, prompt_tokens: int, n: int, max_tokens: int):
    """What one chat request is counted against: its person's requests, and its key's requests and tokens (prompt
    + n x max_tokens, reserved at admission), which no `user` value escapes. The admin key has no key totals."""
    budgets = [Budget("chat", person, 1, settings.chat_rate_per_minute, "chat requests per minute per user")]
    if not caller.is_admin:
        budgets += [
            Budget("chat-key", caller.user, 1, settings.key_chat_rate_per_minute, "chat requests per minute per key"),
            Budget(
                "tokens-key",
                caller.user,
                prompt_tokens + n * max_tokens,
                settings.key_tokens_per_minute,
                "tokens (prompt + n x max_tokens) per minute per key",
            ),
        ]
    return budgets
