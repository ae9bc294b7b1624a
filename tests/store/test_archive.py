"""The feedback-log archive (store/archive.py) against a real redis-server: entries are written to the archive before
they are trimmed, a failed archive leaves the log untrimmed, and `alignd import` of the archive restores the votes
into an empty database, twice without counting anything twice."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from store import feedback as fb
from store import keys, retention
from store.archive import archive_path
from store.client import connect
from store.comparisons import feedback_comparisons
from store.exchange import import_preferences, read_preferences
from tests.store.test_exchange import BODY, LIMITS, seed
from tests.workers.helpers import ROOT


def _settle_all(r) -> list[fb.FeedbackEvent]:
    taken = fb.read_new(r, "w1", 1000)
    fb.ack(r, taken)
    return taken


def _items(r) -> tuple[list, list]:
    comparisons, rated = feedback_comparisons(r)
    return [c.stored() for c in comparisons], [s.stored() for s in rated]


def _vote(r, cid: str, user: str, **body):
    vote = BODY.validate_python({"completion_id": cid, **body})
    return fb.submit_feedback(r, vote, user=user, limits=LIMITS, is_admin=user == "admin").event


def _lines(archive_dir) -> list[dict]:
    return [json.loads(line) for f in sorted(archive_dir.iterdir()) for line in f.read_text().splitlines()]


def test_trimmed_entries_are_archived_and_an_import_restores_the_votes(r, redis_url, tmp_path):
    archive_dir = tmp_path / "archive"
    seed(r)  # pairwise pref/tie/both_bad, a rank of 4, a thumbs pair and an unpaired thumb
    first = _settle_all(r)
    assert retention.trim_settled_feedback(r, keep_s=0, archive_dir=archive_dir) == len(first) == 7
    assert r.xlen(keys.feedback_stream()) == 0
    lines = _lines(archive_dir)
    assert [line["stream_id"] for line in lines] == [e.stream_id for e in first]
    assert all(line["kind"] == "vote" and line["completion"]["id"] == line["event"]["completion_id"] for line in lines)
    # after the trim: alice changes her mind on "p", bob's lone thumb down on "h" gains a thumb up (a pair now)
    _vote(r, "p", "alice", type="pairwise", winner=0)
    _vote(r, "h", "admin", type="thumbs", choice=0, value="up")
    second = _settle_all(r)
    assert retention.trim_settled_feedback(r, keep_s=0, archive_dir=archive_dir) == len(second) == 2
    # a trim killed between its archive write and its XTRIM writes the same entries again on the next one
    path = archive_path(archive_dir, first[0].created)
    path.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[0])
    assert len(_lines(archive_dir)) == 10

    fresh = connect(redis_url.rsplit("/", 1)[0] + "/1")  # another database of the same server: a new deployment
    fresh.flushdb()
    try:
        env = {
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "ALIGND_REDIS_URL": redis_url.rsplit("/", 1)[0] + "/1",
            "ALIGND_HOME": str(tmp_path / "home"),
        }
        cmd = [sys.executable, "-m", "alignd.cli", "import", str(path), "--json"]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        # 7 + 2 entries, one of them twice; alice's first "p" vote is older than her revision in either order
        assert report["bad_lines"] == [] and report["votes"] == report["imported"]
        assert report["imported"] + report["duplicates"] == 10 and report["duplicates"] >= 1
        assert _items(fresh) == _items(r)  # the same latest votes give the same comparisons and ratings
        for cid in ("p", "t", "b", "k", "h"):
            assert fresh.hgetall(keys.feedback_latest(cid)).keys() == r.hgetall(keys.feedback_latest(cid)).keys()
            assert [e.id for e in fb.latest_votes(fresh, cid)] == [e.id for e in fb.latest_votes(r, cid)]
            assert fresh.ttl(keys.completion(cid)) == -1  # voted on: kept, as in the original
        again = import_preferences(fresh, path)
        assert again["imported"] == 0 and again["duplicates"] == 10 and _items(fresh) == _items(r)
        # a preference file for `alignd train reward --data` gives the same items without any store
        offline = read_preferences(path)
        assert offline["bad_lines"] == []
        assert sorted(json.dumps(c.stored(), sort_keys=True) for c in offline["comparisons"]) == sorted(
            json.dumps(c, sort_keys=True) for c in _items(r)[0]
        )
        assert [s.stored() for s in offline["rated"]] == _items(r)[1]
    finally:
        fresh.flushdb()
        fresh.close()


def test_a_failed_archive_write_leaves_the_log_untrimmed(r, tmp_path, caplog):
    seed(r)
    _settle_all(r)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the archive folder should be")
    with caplog.at_level(logging.ERROR, logger="alignd.retention"):
        assert retention.trim_settled_feedback(r, keep_s=0, archive_dir=blocked) == 0
    assert r.xlen(keys.feedback_stream()) == 7 and "the log is left untrimmed" in caplog.text
    assert retention.trim_settled_feedback(r, keep_s=0, archive_dir=tmp_path / "ok") == 7  # once it can write
    assert len(_lines(tmp_path / "ok")) == 7


def test_an_archive_line_that_does_not_fit_its_completion_is_a_bad_line(r, tmp_path):
    seed(r)
    _settle_all(r)
    retention.trim_settled_feedback(r, keep_s=0, archive_dir=tmp_path)
    line = _lines(tmp_path)[0]
    bad = [
        {**line, "event": {**line["event"], "completion_id": "other"}},
        {**line, "completion": {**line["completion"], "choices": line["completion"]["choices"][:1]}},
        {**line, "completion": None, "event": {**line["event"], "completion_id": "gone"}},
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(b) + "\n" for b in bad))
    r.flushdb()
    report = import_preferences(r, path)
    assert [n for n, _ in report["bad_lines"]] == [1, 2, 3] and report["imported"] == 0
    assert "neither in the line nor in the store" in report["bad_lines"][2][1]
