"""The feedback log: users' votes on completions, accepted atomically, durably and idempotently.

A vote is one of three types (the request bodies below):
- thumbs:   {"completion_id", "type": "thumbs", "choice": i, "value": "up" | "down"}
- pairwise: {"completion_id", "type": "pairwise", "winner": 0 | 1 | "tie" | "both_bad"}  (two-choice completions)
- rank:     {"completion_id", "type": "rank", "ranking": [best, …, worst]}  (a permutation of the choice indices)
each with an optional `comment`, an optional client-chosen `feedback_id` for idempotent retries and an optional
`user`: the OpenAI field naming the person behind the API key (a chat front end holds one key for many people).

The *annotator* of a vote is (API key, user), written `annotator_id(key user id, user)`: the key's user id alone when
`user` is absent or equals it (the behaviour before the field existed), `"<key user id>/<user>"` otherwise. With the
admin key, `user` names the annotator outright: an annotation tool holding the admin key labels on behalf of named
people (re-served overlap and gold items). Every per-person thing is per annotator: the rate limits, the latest vote
(revisions), the vote counters and the reliability estimates. What one key can do is bounded whatever `user` values
it sends: per-key event totals (per minute, per UTC day), a cap on the distinct annotators one key votes as per day,
and arena outcomes held per key (its latest vote on a completion counts once), unless the key is a trusted annotation
tool (`annotator` in ALIGND_API_KEYS) or the admin key. *Ownership* (may this caller vote on this completion?) is per
key, and per (key, user) when the chat request named a `user`: only that person (or a trusted tool) votes on it.

Acceptance is ONE Lua script (EVALSHA, one round trip), so it is all-or-nothing and needs no lock:
  the completion (exists? the caller's? choice index / ranking valid for its choices?) → idempotency check →
  per-user rate counters (per minute, per UTC day; only accepted events count) → XADD to the log → the latest vote of
  (completion, slot, user) with its revision and full history → vote/event counters for stats → the completion's
  place in the index of recent votes (store/recent.py) → idempotency record.
Every check comes before the first write, so a refused request changes nothing. With `appendfsync always` the
reply is sent only after the script's writes are on disk: a 2xx means the event survives a crash. The script reads
the completion record with cjson but never decodes the client's comment: the event JSON is built by Python
(ASCII-only) and the script only appends the versions and the revision to it.

A *slot* is what a revision replaces: "pairwise", "rank", or "thumbs:<choice>" (a thumb on choice 0 and one on
choice 1 are two votes; a second thumb on choice 0 revises the first). The latest vote per slot is what comparisons
use (store/comparisons.py); the history and the log keep every revision.

Workers consume the log through the consumer group `trainer` (`read_new`, `ack`), reclaiming entries a crashed
consumer left pending with XAUTOCLAIM. Entries training has settled (acknowledged, none pending before them) are
trimmed by `store.retention.trim_settled_feedback`; what training uses lives on in the latest votes.

Retention of the rest: the idempotency record of a feedback id and the history of a vote expire
`FeedbackLimits.records_ttl_s` after their last write (a retry with the same feedback_id is recognised within that
window); an accepted vote makes its completion record permanent.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aredis
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

from store import keys

GROUP = "trainer"  # the consumer group of the training workers
FEEDBACK_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
USER_PATTERN = re.compile(r"^[A-Za-z0-9_.@+=:-]{1,64}$")  # no '/': it separates key and user in an annotator id
USER_RULE = (
    "user must be 1-64 characters of letters, digits and _ . @ + = : - (an opaque id of the person using your "
    "API key, e.g. a hash of their account id)"
)
CLAIM_IDLE_MS = 60_000  # a delivered entry unacked this long belongs to a dead consumer (a training read takes < 1 s)
MINUTE_S = 60
DAY_COUNTER_SLACK_S = 3600  # the day counter outlives its day a little, so a clock skew between API hosts is harmless
ACK_CHUNK = 1000  # ids per XACK call (Lua's unpack has a stack limit of ~8000)


# --- request bodies (a discriminated union on "type"; the API uses them as its schema)


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: 1.0 or true is not a choice index

    completion_id: str = Field(min_length=1, max_length=256)
    comment: str | None = None  # length is checked against Settings.max_comment_chars in `prepare`
    feedback_id: str | None = Field(
        None,
        pattern=FEEDBACK_ID_PATTERN,
        description="client-chosen id: a retry with the same id and body is answered "
        "with the first answer and adds nothing",
    )
    user: str | None = Field(
        None, description="the person behind the API key (OpenAI's `user`); the annotator is (key, user)"
    )

    @field_validator("user")
    @classmethod
    def _user(cls, v: str | None) -> str | None:
        return check_user(v)

    @field_validator("completion_id", "comment")
    @classmethod
    def _unicode_text(cls, v: str | None) -> str | None:
        # JSON may carry lone surrogates ("\ud800"): they are not text, and Redis keys and JSON readers refuse them
        if v is not None:
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("must be valid Unicode text (no lone surrogate escapes)") from None
        return v


def check_user(v: str | None) -> str | None:
    """The OpenAI `user` field as alignd accepts it (chat and feedback alike), or ValueError with the rule."""
    if v is not None and not USER_PATTERN.fullmatch(v):
        raise ValueError(USER_RULE)
    return v


def annotator_id(key_user: str, user: str | None, *, is_admin: bool = False) -> str:
    """Who a vote (or chat request) is from: (API key, `user`) as one string; see the module docstring."""
    if user is None or user == key_user:
        return key_user
    return user if is_admin else f"{key_user}/{user}"


class ThumbsFeedback(_FeedbackBase):
    type: Literal["thumbs"]
    choice: StrictInt = Field(ge=0)
    value: Literal["up", "down"]


class PairwiseFeedback(_FeedbackBase):
    type: Literal["pairwise"]
    winner: Literal[0, 1, "tie", "both_bad"]

    @field_validator("winner", mode="before")
    @classmethod
    def _no_bool_or_float(cls, v: Any) -> Any:
        if isinstance(v, bool | float):  # Literal ignores strict mode and would take True as 1
            raise ValueError("winner must be 0, 1, 'tie' or 'both_bad'")
        return v


class RankFeedback(_FeedbackBase):
    type: Literal["rank"]
    ranking: list[StrictInt] = Field(min_length=2, max_length=1024, description="choice indices, best first")


FeedbackIn = Annotated[ThumbsFeedback | PairwiseFeedback | RankFeedback, Field(discriminator="type")]


class FeedbackEvent(BaseModel):
    """One accepted vote as kept in the log (and as `read_new` returns it)."""

    model_config = ConfigDict(extra="ignore")

    stream_id: str = ""  # position in the log; what `ack` takes
    id: str  # the feedback id (client-chosen or generated)
    completion_id: str
    user: str  # the annotator: annotator_id(key user id, client_user)
    client_user: str | None = None  # the request's `user` field, as sent
    type: Literal["thumbs", "pairwise", "rank"]
    slot: str
    choice: int | None = None
    value: Literal["up", "down"] | None = None
    winner: int | str | None = None
    ranking: list[int] | None = None
    comment: str | None = None
    created: float
    version: int  # the completion's served version
    choice_versions: list[int]  # version of each choice, by index (they differ in arena mode)
    revision: int  # 1 for the first vote of this user on this slot, n for its n-th revision


@dataclass(frozen=True)
class FeedbackLimits:
    per_minute: int  # Settings.feedback_rate_per_minute
    per_day: int  # Settings.feedback_daily_cap
    max_comment_chars: int  # Settings.max_comment_chars
    key_per_minute: int | None = None  # Settings.key_feedback_rate_per_minute; None: no key total
    key_per_day: int | None = None  # Settings.key_feedback_daily_cap
    key_annotators: int | None = None  # Settings.key_annotators_per_day; None: no cap
    records_ttl_s: int | None = None  # Settings.feedback_records_ttl_s; None: idempotency records and histories kept


@dataclass(frozen=True)
class Accepted:
    event: FeedbackEvent
    replayed: bool  # True: an idempotent retry answered from the first acceptance; nothing was added

    def response(self) -> dict[str, Any]:
        e = self.event
        return {
            "id": e.id,
            "object": "feedback",
            "completion_id": e.completion_id,
            "type": e.type,
            "revision": e.revision,
            "created": int(e.created),
        }


# --- errors (the API maps each class to its HTTP status)


class FeedbackError(Exception):
    code = "invalid_feedback"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class CompletionNotFound(FeedbackError):
    code = "completion_not_found"


class NotYourCompletion(FeedbackError):
    code = "not_your_completion"


class InvalidFeedback(FeedbackError):
    code = "invalid_value"


class FeedbackIdConflict(FeedbackError):
    code = "feedback_id_conflict"


class FeedbackScriptError(RuntimeError):
    """The acceptance script answered a status this module does not know: a server-side fault (HTTP 500), not a
    refusal of the request."""


class FeedbackRateLimited(FeedbackError):
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


# --- preparing a vote (no Redis: what can be checked from the body alone)


def prepare(
    body: ThumbsFeedback | PairwiseFeedback | RankFeedback, *, user: str, max_comment_chars: int, now: float
) -> dict[str, Any]:
    """The event as far as the body defines it (the script adds versions and revision from Redis), or raise.
    `user` is the annotator (`annotator_id`)."""
    if body.comment is not None and len(body.comment) > max_comment_chars:
        raise InvalidFeedback(
            f"comment has {len(body.comment)} characters; the limit is {max_comment_chars}", "comment"
        )
    event: dict[str, Any] = {
        "id": body.feedback_id or f"fb-{uuid.uuid4().hex}",
        "completion_id": body.completion_id,
        "user": user,
        "type": body.type,
    }
    if body.user is not None:
        event["client_user"] = body.user
    if isinstance(body, ThumbsFeedback):
        event |= {"slot": f"thumbs:{body.choice}", "choice": body.choice, "value": body.value}
    elif isinstance(body, PairwiseFeedback):
        event |= {"slot": "pairwise", "winner": body.winner}
    else:
        event |= {"slot": "rank", "ranking": list(body.ranking)}
    event |= {"comment": body.comment, "created": now}
    return event


def fingerprint(body: ThumbsFeedback | PairwiseFeedback | RankFeedback, user: str) -> str:
    """What makes two requests 'the same' for idempotency: the caller and the body (minus the feedback id)."""
    # `user` is the annotator, which already holds the body's `user` field (and fingerprints stay as they were before
    # the field existed)
    content = {"user": user, **body.model_dump(exclude={"feedback_id", "user"})}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# --- the acceptance script: one round trip, all-or-nothing

ACCEPT_LUA = """
-- KEYS: 1 completion, 2 idempotency hash, 3 log stream, 4 minute counter, 5 day counter, 6 history list,
--       7 latest-vote hash, 8 latest-vote counter fields hash, 9 set of completions with votes,
--       10 event counters, 11 vote counters, 12 key minute counter, 13 key day counter, 14 key's annotators today,
--       15 recent index (completion id → time of its latest vote)
-- ARGV: 1 user, 2 is admin ('1' or '0'), 3 type, 4 choice | winner | ranking (JSON), 5 thumbs value,
--       6 fingerprint, 7 event JSON without its closing brace, 8 latest-vote field, 9 completion id,
--       10 per-minute limit, 11 per-day limit, 12 minute counter ttl, 13 day counter ttl,
--       14 the API key's user id (ownership is per key; ARGV[1], the annotator, is per key and person),
--       15 key per-minute limit, 16 key per-day limit, 17 distinct annotators per key per day ('0': no cap),
--       18 the vote-counter field holding this vote's arena outcome (per key unless the key is trusted),
--       19 trusted annotation tool ('1' or '0'), 20 the request's `user` ('' when absent),
--       21 ttl of the idempotency record and the vote history ('0': kept), 22 now (s)
local raw = redis.call('GET', KEYS[1])
if not raw then return {'not_found'} end
local record = cjson.decode(raw)
local user, kind = ARGV[1], ARGV[3]
if record['user'] ~= ARGV[14] and ARGV[2] ~= '1' then return {'forbidden'} end
-- a completion requested for a named `user` of the key is that person's to vote on (or a trusted tool's)
local params = record['params']
if ARGV[2] ~= '1' and ARGV[19] ~= '1' and type(params) == 'table' then
  local owner = params['client_user']
  if type(owner) == 'string' and owner ~= record['user'] and owner ~= ARGV[20] then return {'not_your_user'} end
end
local n = #record['choices']
local versions = {}  -- policy version of each choice, by index + 1
for _, c in ipairs(record['choices']) do versions[c['index'] + 1] = c['version'] end
local function int(x) return string.format('%d', x) end
-- vote counters: the current vote holds these (see store/stats.py); arena fields are seen from the higher version
local fields = {'total', 'type:' .. kind, 'user:' .. user, 'version:' .. int(record['version'])}
local event_fields = {fields[1], fields[2], fields[3], fields[4]}  -- every event counts here, revisions too
-- arena outcomes are held per key (ARGV[18]): however many `user` values one key votes as, its latest vote on a
-- completion counts once in the live win rate that can roll a version back
local afields = {}
local function arena(a, b) return 'arena:' .. int(math.max(a, b)) .. '_vs_' .. int(math.min(a, b)) end
local function outcome(better, worse)
  if better > worse then return arena(better, worse) .. ':win' end
  return arena(better, worse) .. ':loss'
end
if kind == 'thumbs' then
  local choice = tonumber(ARGV[4])
  if choice >= n then return {'bad_choice', n} end
  fields[#fields + 1] = 'thumbs:' .. int(versions[choice + 1]) .. ':' .. ARGV[5]
elseif kind == 'pairwise' then
  if n ~= 2 then return {'bad_pairwise', n} end
  if versions[1] ~= versions[2] then
    if ARGV[4] == 'tie' or ARGV[4] == 'both_bad' then
      afields[#afields + 1] = arena(versions[1], versions[2]) .. ':' .. ARGV[4]
    else
      local w = tonumber(ARGV[4])
      afields[#afields + 1] = outcome(versions[w + 1], versions[2 - w])
    end
  end
else
  if n < 2 then return {'bad_rank', n} end
  local ranking = cjson.decode(ARGV[4])
  if #ranking ~= n then return {'bad_ranking', n} end
  local seen = {}
  for _, i in ipairs(ranking) do
    if i < 0 or i >= n or seen[i] then return {'bad_ranking', n} end
    seen[i] = true
  end
  for a = 1, n do
    for b = a + 1, n do
      local better, worse = versions[ranking[a] + 1], versions[ranking[b] + 1]
      if better ~= worse then afields[#afields + 1] = outcome(better, worse) end
    end
  end
end
local seen_id = redis.call('HMGET', KEYS[2], 'fingerprint', 'event', 'stream_id')
if seen_id[1] then
  if seen_id[1] == ARGV[6] then return {'replay', seen_id[2], seen_id[3]} end
  return {'conflict'}
end
if tonumber(redis.call('GET', KEYS[4]) or '0') >= tonumber(ARGV[10]) then return {'rate_minute'} end
if tonumber(redis.call('GET', KEYS[5]) or '0') >= tonumber(ARGV[11]) then return {'rate_day'} end
if tonumber(redis.call('GET', KEYS[12]) or '0') >= tonumber(ARGV[15]) then return {'key_minute'} end
if tonumber(redis.call('GET', KEYS[13]) or '0') >= tonumber(ARGV[16]) then return {'key_day'} end
local cap = tonumber(ARGV[17])
if cap > 0 and redis.call('SISMEMBER', KEYS[14], user) == 0 and redis.call('SCARD', KEYS[14]) >= cap then
  return {'annotators', cap}
end
local old = redis.call('HGET', KEYS[8], ARGV[8])
local old_fields = {}
if old then old_fields = cjson.decode(old) end
local old_arena = redis.call('HGET', KEYS[8], ARGV[18])
local old_afields = {}
if old_arena then old_afields = cjson.decode(old_arena) end
-- every check and decode is above this line: a refused request has written nothing
local choice_versions = {}
for i = 1, n do choice_versions[i] = int(versions[i]) end
local revision = redis.call('LLEN', KEYS[6]) + 1
-- spliced in as text: the client's comment is never decoded or re-encoded here
local event = ARGV[7] .. ',"version":' .. int(record['version']) .. ',"choice_versions":[' ..
  table.concat(choice_versions, ',') .. '],"revision":' .. revision .. '}'
local stream_id = redis.call('XADD', KEYS[3], '*', 'event', event)
redis.call('RPUSH', KEYS[6], event)
redis.call('HSET', KEYS[7], ARGV[8], event)
redis.call('HSET', KEYS[8], ARGV[8], cjson.encode(fields))
if #afields > 0 or old_arena then redis.call('HSET', KEYS[8], ARGV[18], cjson.encode(afields)) end
redis.call('SADD', KEYS[9], ARGV[9])
redis.call('ZADD', KEYS[15], ARGV[22], ARGV[9])
if redis.call('INCR', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ARGV[12]) end
if redis.call('INCR', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ARGV[13]) end
if redis.call('INCR', KEYS[12]) == 1 then redis.call('EXPIRE', KEYS[12], ARGV[12]) end
if redis.call('INCR', KEYS[13]) == 1 then redis.call('EXPIRE', KEYS[13], ARGV[13]) end
if cap > 0 and redis.call('SADD', KEYS[14], user) == 1 then redis.call('EXPIRE', KEYS[14], ARGV[13]) end
for _, f in ipairs(event_fields) do redis.call('HINCRBY', KEYS[10], f, 1) end
for _, f in ipairs(old_fields) do redis.call('HINCRBY', KEYS[11], f, -1) end
for _, f in ipairs(fields) do redis.call('HINCRBY', KEYS[11], f, 1) end
for _, f in ipairs(old_afields) do redis.call('HINCRBY', KEYS[11], f, -1) end
for _, f in ipairs(afields) do redis.call('HINCRBY', KEYS[11], f, 1) end
redis.call('HSET', KEYS[2], 'fingerprint', ARGV[6], 'event', event, 'stream_id', stream_id)
redis.call('PERSIST', KEYS[1])  -- a completion with a vote is training data: it no longer expires
if ARGV[21] ~= '0' then
  redis.call('EXPIRE', KEYS[2], ARGV[21])
  redis.call('EXPIRE', KEYS[6], ARGV[21])
end
return {'accepted', event, stream_id}
"""

ACK_LUA = """
local n = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
if n > 0 then redis.call('INCRBY', KEYS[2], n) end
return n
"""

_scripts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _script(r: redis.Redis | aredis.Redis, name: str, source: str):
    """The client's registered script (EVALSHA, loaded again by redis-py after a server restart)."""
    per_client = _scripts.setdefault(r, {})
    if name not in per_client:
        per_client[name] = r.register_script(source)
    return per_client[name]


def latest_field(slot: str, user: str) -> str:
    return f"{slot}|{user}"  # slots never contain '|', so the first '|' splits it back


def _seconds_to_utc_midnight(now: float) -> float:
    day = datetime.fromtimestamp(now, UTC)
    return (datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=1) - day).total_seconds()


UNLIMITED = 2**53  # a count no counter reaches (Lua numbers are doubles)


def _script_call(
    body: ThumbsFeedback | PairwiseFeedback | RankFeedback,
    event: dict[str, Any],
    key_user: str,
    is_admin: bool,
    limits: FeedbackLimits,
    now: float,
    trusted: bool = False,
) -> tuple[list[str], list[Any]]:
    cid, slot, user = body.completion_id, event["slot"], event["user"]
    day = datetime.fromtimestamp(now, UTC)
    script_keys = [
        keys.completion(cid),
        keys.feedback_idempotency(event["id"]),
        keys.feedback_stream(),
        keys.rate("feedback", user, f"{MINUTE_S}:{int(now // MINUTE_S)}"),
        keys.rate("feedback", user, f"day:{day:%Y%m%d}"),
        keys.feedback_history(cid, slot, user),
        keys.feedback_latest(cid),
        keys.feedback_vote_counters(cid),
        keys.feedback_completions(),
        keys.feedback_stats("events"),
        keys.feedback_stats("votes"),
        keys.rate("feedback-key", key_user, f"{MINUTE_S}:{int(now // MINUTE_S)}"),
        keys.rate("feedback-key", key_user, f"day:{day:%Y%m%d}"),
        keys.key_annotators(key_user, f"{day:%Y%m%d}"),
        keys.feedback_recent(),
    ]
    if isinstance(body, ThumbsFeedback):
        detail, value = str(body.choice), body.value
    elif isinstance(body, PairwiseFeedback):
        detail, value = str(body.winner), ""
    else:
        detail, value = json.dumps(body.ranking), ""
    head = json.dumps(event, separators=(",", ":"))[:-1]  # ASCII-only (ensure_ascii), ends before the final '}'
    args = [
        user,
        "1" if is_admin else "0",
        body.type,
        detail,
        value,
        fingerprint(body, user),
        head,
        latest_field(slot, user),
        cid,
        limits.per_minute,
        limits.per_day,
        MINUTE_S + 1,
        int(_seconds_to_utc_midnight(now)) + DAY_COUNTER_SLACK_S,
        key_user,
        UNLIMITED if is_admin or limits.key_per_minute is None else limits.key_per_minute,
        UNLIMITED if is_admin or limits.key_per_day is None else limits.key_per_day,
        0 if is_admin or trusted or limits.key_annotators is None else limits.key_annotators,
        # arena outcomes per key, or per annotator for the admin key and trusted tools (see ACCEPT_LUA)
        "arena|" + latest_field(slot, user if is_admin or trusted else key_user),
        "1" if trusted else "0",
        body.user or "",
        limits.records_ttl_s or 0,
        repr(now),
    ]
    return script_keys, args


def _outcome(
    result: list,
    body: ThumbsFeedback | PairwiseFeedback | RankFeedback,
    event_id: str,
    limits: FeedbackLimits,
    now: float,
) -> Accepted:
    """The Accepted vote, or the FeedbackError for each refusal status ACCEPT_LUA returns."""
    status = result[0]
    n = result[1] if len(result) > 1 else 0
    match status:
        case "accepted" | "replay":
            event = FeedbackEvent.model_validate_json(result[1])
            event.stream_id = result[2]
            return Accepted(event=event, replayed=status == "replay")
        case "not_found":
            raise CompletionNotFound(
                f"no completion with id {body.completion_id!r}: send the id of a chat completion this server returned",
                "completion_id",
            )
        case "forbidden":
            raise NotYourCompletion(
                "feedback on a completion is open to the user who received it (or the admin key)", "completion_id"
            )
        case "not_your_user":
            raise NotYourCompletion(
                "this completion was requested for a named `user` of this key: feedback on it must name the same "
                "`user`",
                "user",
            )
        case "bad_choice":
            raise InvalidFeedback(f"choice {body.choice} is out of range: the completion has {n} choice(s)", "choice")
        case "bad_pairwise":
            raise InvalidFeedback(
                f"pairwise feedback needs a completion with exactly 2 choices; this one has {n}"
                + ("; use rank" if n > 2 else "; use thumbs"),
                "type",
            )
        case "bad_rank":
            raise InvalidFeedback(
                f"rank feedback needs at least 2 choices; this completion has {n}: use thumbs", "type"
            )
        case "bad_ranking":
            raise InvalidFeedback(
                f"ranking must be a permutation of the choice indices 0..{n - 1}, best first; got {body.ranking}",
                "ranking",
            )
        case "conflict":
            raise FeedbackIdConflict(
                f"feedback_id {event_id!r} was already used for a different request: use a new id for new feedback",
                "feedback_id",
            )
        case "rate_minute" | "key_minute" | "key_day" | "annotators" | "rate_day":
            raise _rate_limited(status, limits, now)
    # the script and this function disagree (a bug, or a Redis holding another release's script): not the client's
    # fault, so no 4xx; the API answers 500 and logs this message
    raise FeedbackScriptError(
        f"the feedback acceptance script answered an unknown status {status!r} (whole answer "
        f"{result!r}); the vote was not recorded"
    )


def _rate_limited(status: str, limits: FeedbackLimits, now: float) -> FeedbackRateLimited:
    """The 429 for a rate or cap status of ACCEPT_LUA, with the seconds until its window ends."""
    match status:
        case "rate_minute":
            retry = int(MINUTE_S - now % MINUTE_S) + 1
            return FeedbackRateLimited(
                f"feedback rate limit: at most {limits.per_minute} events per minute; retry in {retry} s", retry
            )
        case "key_minute":
            retry = int(MINUTE_S - now % MINUTE_S) + 1
            return FeedbackRateLimited(
                f"feedback rate limit of this key: at most {limits.key_per_minute} events per minute, all its users "
                f"together; retry in {retry} s",
                retry,
            )
        case "key_day" | "annotators":
            retry = int(_seconds_to_utc_midnight(now)) + 1
            what = (
                f"at most {limits.key_per_day} events per UTC day, all its users together"
                if status == "key_day"
                else f"at most {limits.key_annotators} distinct `user` values vote through one key per UTC day"
            )
            return FeedbackRateLimited(f"daily feedback cap of this key reached: {what}; retry in {retry} s", retry)
        case "rate_day":
            retry = int(_seconds_to_utc_midnight(now)) + 1
            return FeedbackRateLimited(
                f"daily feedback cap reached: at most {limits.per_day} events per UTC day; "
                f"retry in {retry} s (after 00:00 UTC)",
                retry,
            )
    raise ValueError(f"not a rate-limit status: {status!r}")


def submit_feedback(
    r: redis.Redis,
    body: ThumbsFeedback | PairwiseFeedback | RankFeedback,
    *,
    user: str,
    limits: FeedbackLimits,
    is_admin: bool = False,
    trusted: bool = False,
    now: float | None = None,
) -> Accepted:
    """Accept one vote (or answer an idempotent retry) in one round trip; raise a FeedbackError for anything refused.

    `r` is a decode_responses client (store.client.connect). `user` is the API key's user id; the annotator is
    `annotator_id(user, body.user)`. `trusted`: the key is an annotation tool (its users count apart in the arena
    and may vote on any completion of the key). `now` is for tests of the rate windows.
    """
    now = time.time() if now is None else now
    annotator = annotator_id(user, body.user, is_admin=is_admin)
    event = prepare(body, user=annotator, max_comment_chars=limits.max_comment_chars, now=now)
    script_keys, args = _script_call(body, event, user, is_admin, limits, now, trusted)
    return _outcome(_script(r, "accept", ACCEPT_LUA)(keys=script_keys, args=args), body, event["id"], limits, now)


async def asubmit_feedback(
    r: aredis.Redis,
    body: ThumbsFeedback | PairwiseFeedback | RankFeedback,
    *,
    user: str,
    limits: FeedbackLimits,
    is_admin: bool = False,
    trusted: bool = False,
    now: float | None = None,
) -> Accepted:
    """`submit_feedback` for the asyncio client of the API."""
    now = time.time() if now is None else now
    annotator = annotator_id(user, body.user, is_admin=is_admin)
    event = prepare(body, user=annotator, max_comment_chars=limits.max_comment_chars, now=now)
    script_keys, args = _script_call(body, event, user, is_admin, limits, now, trusted)
    result = await _script(r, "accept", ACCEPT_LUA)(keys=script_keys, args=args)
    return _outcome(result, body, event["id"], limits, now)


# --- reading votes back


def get_feedback(r: redis.Redis, feedback_id: str) -> FeedbackEvent | None:
    event, stream_id = r.hmget(keys.feedback_idempotency(feedback_id), "event", "stream_id")
    if event is None:
        return None
    out = FeedbackEvent.model_validate_json(event)
    out.stream_id = stream_id
    return out


def latest_votes(r: redis.Redis, completion_id: str) -> list[FeedbackEvent]:
    """The current vote of every (slot, user) on one completion, ordered by slot then user."""
    raw = r.hgetall(keys.feedback_latest(completion_id))
    return [FeedbackEvent.model_validate_json(raw[f]) for f in sorted(raw)]


def vote_history(r: redis.Redis, completion_id: str, slot: str, user: str) -> list[FeedbackEvent]:
    """Every revision of one vote, oldest first (revision i is at position i - 1)."""
    return [
        FeedbackEvent.model_validate_json(e) for e in r.lrange(keys.feedback_history(completion_id, slot, user), 0, -1)
    ]


# --- the consumer API for training workers


def ensure_group(r: redis.Redis) -> None:
    """Create the `trainer` group at the start of the log (so it sees every event ever accepted), once."""
    try:
        r.xgroup_create(keys.feedback_stream(), GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _events(entries: list) -> list[FeedbackEvent]:
    out = []
    for stream_id, fields in entries:
        if not fields:  # an entry deleted while pending (alignd never deletes; another tool might)
            continue
        event = FeedbackEvent.model_validate_json(fields["event"])
        event.stream_id = stream_id
        out.append(event)
    return out


def read_new(r: redis.Redis, consumer: str, count: int, *, claim_idle_ms: int = CLAIM_IDLE_MS) -> list[FeedbackEvent]:
    """Up to `count` events for `consumer`: first those a dead consumer left pending longer than `claim_idle_ms`
    (XAUTOCLAIM), then never-delivered ones (XREADGROUP >). Each stays pending until `ack`."""
    ensure_group(r)
    stream = keys.feedback_stream()
    events: list[FeedbackEvent] = []
    cursor = "0-0"
    while len(events) < count:
        reply = r.xautoclaim(
            stream, GROUP, consumer, min_idle_time=claim_idle_ms, start_id=cursor, count=count - len(events)
        )
        cursor, claimed = reply[0], reply[1]
        events += _events(claimed)
        if cursor in ("0-0", b"0-0"):
            break
    if len(events) < count:
        for _, entries in r.xreadgroup(GROUP, consumer, {stream: ">"}, count=count - len(events)) or []:
            events += _events(entries)
    return events


def ack(r: redis.Redis, ids: list[str] | list[FeedbackEvent]) -> int:
    """Acknowledge consumed events (stream ids or the events themselves); returns how many were pending."""
    stream_ids = [i.stream_id if isinstance(i, FeedbackEvent) else i for i in ids]
    script = _script(r, "ack", ACK_LUA)
    done = 0
    for start in range(0, len(stream_ids), ACK_CHUNK):
        chunk = stream_ids[start : start + ACK_CHUNK]
        done += int(script(keys=[keys.feedback_stream(), keys.feedback_acked()], args=[GROUP, *chunk]))
    return done


def last_event_id(r: redis.Redis) -> str | None:
    """Stream id of the newest accepted event (None before the first): changes with every accepted vote."""
    newest = r.xrevrange(keys.feedback_stream(), count=1)
    return newest[0][0] if newest else None


def pending_count(r: redis.Redis) -> int:
    """Events delivered to a consumer and not yet acknowledged."""
    try:
        return int(r.xpending(keys.feedback_stream(), GROUP)["pending"])
    except redis.ResponseError:  # no log or no group yet
        return 0


def unconsumed_count(r: redis.Redis) -> int:
    """Events not yet delivered-and-acknowledged: XINFO GROUPS lag + pending where the server reports lag (Redis 7);
    otherwise the log length minus the acknowledged entries still in it: the count kept by `ack` less the count
    trimmed (only acknowledged entries are trimmed; XACK counts each entry once; the embedded redis-server is 6.2,
    which has no lag field)."""
    stream = keys.feedback_stream()
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:  # no log yet
        return 0
    group = next((g for g in groups if g["name"] == GROUP), None)
    if group is not None and group.get("lag") is not None:
        return int(group["lag"]) + int(group["pending"])
    acked, trimmed = r.mget(keys.feedback_acked(), keys.feedback_trimmed())
    return r.xlen(stream) - (int(acked or 0) - int(trimmed or 0))
