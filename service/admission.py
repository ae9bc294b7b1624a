"""Admission of chat requests, before any engine work: which model, how long a prompt, whose budget, how much room.

Engine-independent: it sees only the policy objects' `version` and `context` and counts sequences itself.

- `resolve_policy`: `model` may be absent, `alignd`, or `alignd-vN` of a loaded version; anything else is 404
  `model_not_found` (as OpenAI and vLLM answer) rather than silently answered by another model.
- `prompt_limit`: the longest prompt every version a request runs on can take with room to generate: the setting,
  capped by the smallest context less one position (a longer prompt would index past the position table).
- `Admission`: bounded work in flight per API process, answered at once, never queued: a request that would take the
  process over `max_inflight` sequences gets 503 `server_overloaded`; one whose key would hold more than its share
  (`key_inflight_share` of the sequences) or more than `key_inflight_tokens` (n x max_tokens of its requests in
  flight) gets 429 — both with Retry-After. The share leaves room for other keys, so one busy key cannot fill the
  batch. Counting is in memory: each process owns its engine, so its own count is the one that matters.
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from dataclasses import dataclass, field

from core.config import Settings
from service.errors import APIError

_VERSIONED = re.compile(r"^alignd-v(\d{1,9})$")
RETRY_AFTER_S = "1"  # a full batch frees rows within a generation (seconds), so a prompt retry is worth it


def resolve_policy(engine, model: str | None):
    """The policy that answers a request naming `model`, or 404 `model_not_found`."""
    current = engine.current
    if model in (None, "", "alignd"):
        return current
    match = _VERSIONED.fullmatch(model)
    if match:
        version = int(match.group(1))
        if version == current.version:
            return current
        loaded = getattr(engine, "policies", {}).get(version)
        if loaded is not None:
            return loaded
    served = ", ".join(["alignd", *(f"alignd-v{v}" for v in engine.loaded_versions())])
    raise APIError(404, f"the model {model!r} does not exist here; served: {served}", "model_not_found", "model")


def requested_tokens(settings: Settings, req) -> int:
    """n x max_tokens of a chat request (what it may generate), before anything else is known about it."""
    default = min(settings.default_max_tokens, settings.max_new_tokens)
    return req.n * min(req.max_completion_tokens or req.max_tokens or default, settings.max_new_tokens)


def prompt_limit(settings: Settings, engine, policy, versions: list[int | None]) -> int:
    """Longest accepted prompt (tokens) for a request answered by `policy` and, per choice, `versions` (None: the
    policy; an arena choice names the other version)."""
    loaded = getattr(engine, "policies", {})
    policies = [policy, *(loaded.get(v, policy) for v in versions if v is not None)]
    contexts = [int(getattr(p, "context", 0) or 0) for p in policies]
    return min([settings.max_prompt_tokens, *(c - 1 for c in contexts if c > 0)])


@dataclass
class Ticket:
    """The room one request holds; `release` is idempotent and also runs when the request object is collected."""

    admission: Admission
    key: str
    sequences: int
    tokens: int
    released: bool = False

    def bind(self, owner: object) -> Ticket:
        weakref.finalize(owner, self.release)  # a stream never iterated (client gone before the body) still frees it
        return self

    def release(self) -> None:
        self.admission.release(self)


@dataclass
class Admission:
    max_inflight: int  # sequences in this process
    key_share: float  # of max_inflight, per key
    key_tokens: int  # n x max_tokens in flight, per key
    sequences: int = 0
    per_key: dict[str, list[int]] = field(default_factory=dict)  # key → [sequences, tokens]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, settings: Settings) -> Admission:
        return cls(settings.max_inflight, settings.key_inflight_share, settings.key_inflight_tokens)

    @property
    def key_sequences(self) -> int:
        return max(1, math.floor(self.max_inflight * self.key_share))

    def admit(self, key: str, sequences: int, tokens: int) -> Ticket:
        """Room for a request of `sequences` choices and `tokens` = n x max_tokens, or an APIError at once."""
        with self._lock:
            held = self.per_key.get(key, [0, 0])
            if held[0] + sequences > self.key_sequences or held[1] + tokens > self.key_tokens:
                raise APIError(
                    429,
                    f"too many requests in flight for this key: at most {self.key_sequences} sequences and "
                    f"{self.key_tokens} tokens (n x max_tokens) at once; it holds {held[0]} and {held[1]}",
                    "too_many_inflight",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
            if self.sequences + sequences > self.max_inflight:
                raise APIError(
                    503,
                    f"the server is at capacity ({self.max_inflight} sequences in flight); retry shortly",
                    "server_overloaded",
                    headers={"Retry-After": RETRY_AFTER_S},
                )
            self.sequences += sequences
            self.per_key[key] = [held[0] + sequences, held[1] + tokens]
        return Ticket(self, key, sequences, tokens)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            self.sequences -= ticket.sequences
            held = self.per_key[ticket.key]
            held[0] -= ticket.sequences
            held[1] -= ticket.tokens
            if held[0] <= 0:
                del self.per_key[ticket.key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"sequences": self.sequences, "keys": len(self.per_key), "max_inflight": self.max_inflight}


def admission(state) -> Admission:
    """The process's admission counter (one per app state)."""
    found = state.extras.get("admission")
    if found is None:
        found = state.extras["admission"] = Admission.from_settings(state.settings)
    return found


class FullGate:
    """ASGI fast path: while the process has no room for even one sequence, a chat request is answered 503 before
    its body is read, parsed or authenticated — a refusal then costs the event loop almost nothing, which is what
    keeps the admitted requests' latency when hundreds of clients retry (bench/attack.py). Plain ASGI for the same
    reason as service/app.py's BodyLimit."""

    PATH = "/v1/chat/completions"

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == self.PATH and scope["method"] == "POST":
            adm = self.state.extras.get("admission")
            if adm is not None and adm.sequences >= adm.max_inflight:
                from fastapi.responses import JSONResponse

                from service.errors import error_body

                message = f"the server is at capacity ({adm.max_inflight} sequences in flight); retry shortly"
                body = error_body(503, message, "server_overloaded")
                return await JSONResponse(body, 503, headers={"Retry-After": RETRY_AFTER_S})(scope, receive, send)
        return await self.app(scope, receive, send)
