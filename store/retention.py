"""Bounded growth of what Redis keeps: the feedback log trimmed where training has settled it.

The log (store/feedback.py) is how events reach training; once an event is acknowledged — settled by a cycle that
published or recorded a gate failure with it (workers/settle.py) — the log entry has done its work: the vote itself
lives on as the latest vote of its completion, which is what every cycle's comparisons are built from. So the log is
trimmed (XTRIM MINID) up to the oldest entry that is not settled: the first pending one (delivered, not acknowledged:
a running or dead cycle holds it), or the first never delivered, whichever comes first — and never entries younger
than `keep_s` (a day), an operator's window to inspect recent traffic. A cycle in flight records ids that are all
pending until it settles, so nothing it holds can be trimmed.

With an archive directory (`ALIGND_FEEDBACK_ARCHIVE_DIR`), the entries to be trimmed are first appended to a file
there (store/archive.py), fsync'd, and the log is trimmed only after that write succeeded: a failed write (a full
disk, a missing mount) is logged and the log stays as it is until a later trim archives it.

Completion records, idempotency records and vote histories expire by themselves (TTLs set where they are written:
store/completions.py, store/feedback.py); docs/safety.md states the whole policy.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import redis

from store import archive, keys
from store.feedback import GROUP

log = logging.getLogger("alignd.retention")

LOG_KEEP_S = 86400  # settled entries younger than a day stay: recent traffic remains inspectable with XRANGE

# One round trip: the trim and the count `unconsumed_count` subtracts from the acknowledged total, together.
TRIM_LUA = """
local n = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
if n > 0 then redis.call('INCRBY', KEYS[2], n) end
return n
"""


def _after(stream_id: str) -> str:
    """The smallest stream id greater than `stream_id`."""
    ms, _, seq = stream_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _min_id(a: str, b: str) -> str:
    return min(a, b, key=lambda s: tuple(int(x) for x in s.split("-")))


def settled_boundary(r: redis.Redis, keep_s: float, now: float | None = None) -> str | None:
    """The stream id below which every log entry is settled and older than `keep_s` (None: nothing to trim)."""
    stream = keys.feedback_stream()
    try:
        group = next((g for g in r.xinfo_groups(stream) if g["name"] == GROUP), None)
    except redis.ResponseError:  # no log yet
        return None
    if group is None:  # never read by training: nothing is settled
        return None
    boundary = _after(group["last-delivered-id"])
    pending = r.xpending(stream, GROUP)
    if pending["pending"]:
        boundary = _min_id(boundary, pending["min"])
    now = time.time() if now is None else now
    return _min_id(boundary, f"{int((now - keep_s) * 1000)}-0")


def trim_settled_feedback(
    r: redis.Redis, keep_s: float = LOG_KEEP_S, now: float | None = None, *, archive_dir: Path | None = None
) -> int:
    """Trim settled log entries older than `keep_s`, archived first to `archive_dir` when given; returns how many
    were removed (0 when the archive could not be written)."""
    boundary = settled_boundary(r, keep_s, now)
    if boundary is None:
        return 0
    if archive_dir is not None:
        try:
            archive.archive_below(r, archive_dir, boundary, now)
        except Exception as exc:  # whatever stopped the write, the entries must stay in the log
            log.error(
                "feedback archive in %s failed (%s: %s): the log is left untrimmed",
                archive_dir,
                type(exc).__name__,
                exc,
            )
            return 0
    return int(r.eval(TRIM_LUA, 2, keys.feedback_stream(), keys.feedback_trimmed(), boundary))
