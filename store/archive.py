"""The feedback-log archive: entries about to be trimmed, appended to a JSON-lines file that `alignd import` reads
back as votes.

With `ALIGND_FEEDBACK_ARCHIVE_DIR` set, store/retention.py calls `archive_below` before each trim: every log entry
below the trim boundary goes, with the completion record it votes on, to `<dir>/feedback-YYYYMMDD.jsonl` (the UTC
day of the trim), flushed and fsync'd before the trim; a failure leaves the log untrimmed. A line is

    {"kind": "vote", "stream_id": "1733400000000-0", "event": {FeedbackEvent}, "completion": {CompletionRecord}}

Restoring (`restore_votes`, from store/exchange.py's import) writes each vote back as the latest vote of its
(completion, slot, annotator) unless the store holds a newer one (by `created`, then `revision`), and the completion
record when the store has none: the votes and the comparisons derived from them (store/comparisons.py) are the
original's, and importing a file twice — or an archive holding an entry twice, after a trim that crashed between
write and trim — changes nothing the second time. A restored vote is training data; the counters of
/admin/stats count the votes this deployment accepted itself.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from store import keys
from store.completions import CompletionRecord
from store.feedback import FeedbackEvent, latest_field

ARCHIVE_BATCH = 1000  # log entries per XRANGE and per completion-record pipeline


def archive_path(directory: Path, now: float) -> Path:
    return Path(directory) / f"feedback-{datetime.fromtimestamp(now, UTC):%Y%m%d}.jsonl"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def archive_below(r: redis.Redis, directory: Path, boundary: str, now: float | None = None) -> int:
    """Append every log entry with a stream id below `boundary` to the day's archive file and fsync it; returns
    how many. Raises (OSError, a Redis error) when anything could not be written: the caller must not trim then."""
    now = time.time() if now is None else now
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = archive_path(directory, now)
    created = not path.exists()
    stream, start, n = keys.feedback_stream(), "-", 0
    with open(path, "a", encoding="utf-8") as f:
        while True:
            entries = r.xrange(stream, min=start, max=f"({boundary}", count=ARCHIVE_BATCH)
            if not entries:
                break
            events = [(sid, fields["event"]) for sid, fields in entries if fields]
            pipe = r.pipeline(transaction=False)
            for _, raw in events:
                pipe.get(keys.completion(json.loads(raw)["completion_id"]))
            for (sid, raw), record in zip(events, pipe.execute(), strict=True):
                line = {"kind": "vote", "stream_id": sid, "event": json.loads(raw)}
                line["completion"] = json.loads(record) if record else None
                f.write(json.dumps(line) + "\n")  # ASCII-only: any string survives (store/exchange.py)
            n += len(entries)
            start = f"({entries[-1][0]}"
        f.flush()
        os.fsync(f.fileno())
    if created:
        _fsync_dir(directory)  # the file's name survives a crash too
    return n


class BadVote(ValueError):
    """A vote line that cannot be restored; the message is the reason."""


def parse_vote(obj: dict[str, Any]) -> tuple[FeedbackEvent, CompletionRecord | None]:
    """The event and completion of an archive line, checked against each other, or BadVote."""
    extra = set(obj) - {"kind", "stream_id", "event", "completion"}
    if extra:
        raise BadVote(f"unknown fields {sorted(extra)}")
    try:
        event = FeedbackEvent.model_validate(obj.get("event"))
        record = None if obj.get("completion") is None else CompletionRecord.model_validate(obj["completion"])
    except ValueError as exc:
        raise BadVote(f"not a vote: {str(exc).splitlines()[0]}") from None
    if record is not None:
        if record.id != event.completion_id:
            raise BadVote(f"the event votes on {event.completion_id!r}, the completion is {record.id!r}")
        n = len(record.choices)
        if event.type == "thumbs":
            fits = event.choice is not None and 0 <= event.choice < n
        elif event.type == "pairwise":
            fits = n == 2 and event.winner in (0, 1, "tie", "both_bad")
        else:
            fits = sorted(event.ranking or []) == list(range(n))
        if not fits or sorted(c.index for c in record.choices) != list(range(n)):
            raise BadVote(f"the {event.type} vote does not fit the completion's {n} choices")
    return event, record


RESTORE_LUA = """
-- KEYS: 1 completion, 2 latest-vote hash, 3 set of completions with votes, 4 recent index
-- ARGV: 1 completion JSON ('' when the line has none), 2 latest-vote field, 3 event JSON, 4 created, 5 revision,
--       6 completion id
local has = redis.call('EXISTS', KEYS[1]) == 1
if not has then
  if ARGV[1] == '' then return -1 end
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PERSIST', KEYS[1])  -- a completion with a vote is training data
local cur = redis.call('HGET', KEYS[2], ARGV[2])
if cur then
  local c = cjson.decode(cur)
  local created, revision = tonumber(ARGV[4]), tonumber(ARGV[5])
  if c['created'] > created or (c['created'] == created and c['revision'] >= revision) then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], 'GT', ARGV[4], ARGV[6])
return 1
"""


def restore_vote(r: redis.Redis, event: FeedbackEvent, record: CompletionRecord | None) -> int:
    """1: the vote became the latest of its slot; 0: the store holds it or a newer one; -1: no completion record
    anywhere (the line had none, the store has none)."""
    cid = event.completion_id
    return int(
        r.eval(
            RESTORE_LUA,
            4,
            keys.completion(cid),
            keys.feedback_latest(cid),
            keys.feedback_completions(),
            keys.feedback_recent(),
            record.model_dump_json() if record is not None else "",
            latest_field(event.slot, event.user),
            event.model_dump_json(exclude={"stream_id"}),
            repr(event.created),
            event.revision,
            cid,
        )
    )


def votes_to_items(votes: list[tuple[FeedbackEvent, CompletionRecord | None]]):
    """(comparisons, rated) the votes of an archive give on their own (no store): the latest vote of each
    (completion, slot, annotator), derived as store/comparisons.py derives the live ones."""
    from store.comparisons import derive

    records: dict[str, CompletionRecord] = {}
    latest: dict[str, dict[str, FeedbackEvent]] = {}
    for event, record in votes:
        if record is not None:
            records[record.id] = record
        slot = latest.setdefault(event.completion_id, {})
        field = latest_field(event.slot, event.user)
        old = slot.get(field)
        if old is None or (event.created, event.revision) > (old.created, old.revision):
            slot[field] = event
    comparisons, rated = [], []
    for cid in sorted(latest):
        if cid in records:
            c, s = derive(records[cid], [latest[cid][f] for f in sorted(latest[cid])])
            comparisons += c
            rated += s
    return comparisons, rated
