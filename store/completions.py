"""The completion log: every chat completion the API served, so that feedback can refer to it later.

A completion is one JSON document under `alignd:completion:<id>`; its prompt also goes to a capped stream of user
prompts that PPO rollouts sample from. Both are written in one MULTI/EXEC transaction.

Retention: a completion is kept `ttl_s` seconds (Settings.completion_ttl_s) — the window in which feedback on it is
accepted. The first accepted vote makes it permanent (the acceptance script PERSISTs it): it is training data then.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import redis
from pydantic import BaseModel, Field

from store import keys

PROMPT_STREAM_MAXLEN = 20_000  # PPO samples recent prompts; older ones add little and cost memory


class ChoiceRecord(BaseModel):
    index: int
    text: str
    finish_reason: str
    version: int  # the policy version that produced this choice (differs per choice in arena mode)


class CompletionRecord(BaseModel):
    id: str
    user: str
    created: float = Field(default_factory=time.time)
    messages: list[dict[str, str]]
    choices: list[ChoiceRecord]
    version: int  # the served (current) version of the request
    params: dict[str, Any] = Field(default_factory=dict)
    arena: bool = False
    usage: dict[str, int] = Field(default_factory=dict)


def save_completion(r: redis.Redis, record: CompletionRecord, ttl_s: int | None = None) -> None:
    """Record a completion; `ttl_s` None keeps it until a vote or forever (tests, imports)."""
    pipe = r.pipeline(transaction=True)
    pipe.set(keys.completion(record.id), record.model_dump_json(), ex=ttl_s)
    pipe.xadd(
        keys.prompts_stream(),
        {"messages": json.dumps(record.messages), "user": record.user},
        maxlen=PROMPT_STREAM_MAXLEN,
        approximate=True,
    )
    pipe.execute()


def get_completion(r: redis.Redis, completion_id: str) -> CompletionRecord | None:
    raw = r.get(keys.completion(completion_id))
    return CompletionRecord.model_validate_json(raw) if raw else None


def sample_prompts(r: redis.Redis, n: int, rng: random.Random, recent: int = 2000) -> list[list[dict[str, str]]]:
    """Up to `n` user prompts drawn from the `recent` most recent ones (without the assistant turns)."""
    entries = r.xrevrange(keys.prompts_stream(), count=recent)
    if not entries:
        return []
    picked = [entries[rng.randrange(len(entries))] for _ in range(n)]
    return [json.loads(fields["messages"]) for _, fields in picked]
