"""The shape of a training cycle's configuration, published by the workers for the API to check overrides against.

`POST /admin/train` must refuse a bad override before it enqueues anything, but the API never imports the workers
(import layers): so every worker, when it starts, writes the CycleConfig keys with their default values here
(`publish_schema`), and the API checks an override's keys and JSON types against that (`check_overrides`). The
worker still validates everything again when the cycle starts (values, ranges, suites).

Only tuning fields may be overridden through the API: the gate and the evaluation suites (what decides whether a
version ships, and which grader code runs) and the loop's safety settings need `"unsafe": true`, which is recorded
as a registry event with the keys and the caller.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from store import keys

# dotted-key prefixes and top-level keys an API override may set without the unsafe flag
TUNING = ("update.", "ppo.", "dpo.", "kto.", "reward.", "lora.", "max_events", "seed")


class BadOverrides(ValueError):
    """Overrides the API refuses: the message lists what is wrong and the valid keys."""


def publish_schema(r: redis.Redis, defaults: dict[str, Any]) -> None:
    """Record the dotted CycleConfig keys and their defaults (JSON-encodable ones; others as None)."""

    def plain(v: Any) -> Any:
        return v if isinstance(v, (bool, int, float, str, list)) or v is None else None

    r.set(keys.train_config_schema(), json.dumps({k: plain(v) for k, v in defaults.items()}))


def _flatten(data: dict[str, Any], sections: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _same_kind(value: Any, default: Any) -> bool:
    if default is None:
        return True  # optional field: the worker checks it
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def check_overrides(r: redis.Redis, overrides: dict[str, Any], *, unsafe: bool) -> dict[str, Any] | None:
    """The overrides as dotted keys, or BadOverrides; None when no worker has published the schema yet."""
    raw = r.get(keys.train_config_schema())
    if raw is None:
        return None
    schema = json.loads(raw)
    sections = {k.split(".", 1)[0] for k in schema if "." in k}
    flat = _flatten(overrides, sections)
    problems = [f"unknown key {k!r}" for k in flat if k not in schema]
    problems += [
        f"{k}={v!r}: expected a value like {schema[k]!r}"
        for k, v in flat.items()
        if k in schema and not _same_kind(v, schema[k])
    ]
    if not unsafe:
        problems += [
            f'{k!r} is not a tuning field: set "unsafe": true to override it (recorded)'
            for k in flat
            if k in schema and not k.startswith(TUNING)
        ]
    if problems:
        raise BadOverrides("; ".join(problems) + f". Valid keys (nested JSON or dotted): {sorted(schema)}")
    return flat
