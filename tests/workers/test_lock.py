"""store/lock.py and the registry's fencing: one training run at a time, and a stale run can never publish."""

from __future__ import annotations

import time

import pytest

from store import keys, registry
from store.lock import FencedLock, LockBusy
from tests.workers.helpers import make_settings
from workers.publish import publish_version


def test_second_holder_is_refused_and_tokens_increase(r):
    with FencedLock(r, "train", ttl_ms=5000) as first:
        with pytest.raises(LockBusy):
            FencedLock(r, "train").acquire()
        assert r.get(keys.lock("train")) == str(first.token)
    with FencedLock(r, "train", ttl_ms=5000) as second:
        assert second.token == first.token + 1  # the failed attempt did not consume a token
    assert r.get(keys.lock("train")) is None  # released


def test_heartbeat_keeps_the_lock_past_its_ttl_and_detects_loss(r):
    lock = FencedLock(r, "train", ttl_ms=300, heartbeat_s=0.05)
    lock.acquire()
    try:
        time.sleep(0.8)  # well past the TTL: only the heartbeat keeps it
        assert lock.held()
        r.delete(keys.lock("train"))  # expired while the holder was paused; someone else takes it
        thief = FencedLock(r, "train", ttl_ms=5000)
        thief.acquire()
        assert lock.lost.wait(2) and not lock.held()
        assert not lock.extend()  # a stale holder cannot extend the new holder's lock
        assert r.get(keys.lock("train")) == str(thief.token)
        thief.release()
    finally:
        lock.release()


def test_stale_run_cannot_publish(r, tmp_path, redis_url):
    settings = make_settings(tmp_path, redis_url)
    save = lambda d: (d / "weights.bin").write_bytes(b"x")  # noqa: E731  (the registry never opens the files)
    v1 = publish_version(r, settings, save, {"source": "sft", "parent": None}, expected_current=None)
    stale = FencedLock(r, "train", ttl_ms=200, heartbeat_s=60)  # its heartbeat never runs in time: it expires
    stale.acquire()
    time.sleep(0.4)
    with FencedLock(r, "train", ttl_ms=5000) as fresh:
        with pytest.raises(registry.RegistryConflict, match="stale fencing token"):
            publish_version(r, settings, save, {"parent": v1}, expected_current=v1, fencing_token=stale.token)
        assert registry.current_version(r) == v1
        v3 = publish_version(r, settings, save, {"parent": v1}, expected_current=v1, fencing_token=fresh.token)
    assert registry.current_version(r) == v3
    with pytest.raises(registry.RegistryConflict, match="expected"):  # overtaken: the run started from v1
        publish_version(r, settings, save, {"parent": v1}, expected_current=v1)
    stale.release()
    assert registry.current_version(r) == v3
