"""The registry under concurrency (store/registry.py): status updates from many writers at once lose no field, only one
of many racing "first publish" calls wins, and the policy and reward tables keep their own versions and current."""

from __future__ import annotations

import threading

import pytest

from store import registry
from store.client import connect

WRITERS = 8
ROUNDS = 40


def _register(r, n: int) -> None:
    for v in range(1, n + 1):
        assert registry.allocate_version(r) == v
        registry.add_version(r, v, {"path": f"v{v}", "parent": v - 1 or None, "annotators": []})


def _together(n: int, work) -> list:
    """Run work(i) in `n` threads (each with its own connection) released at the same instant; return results."""
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except Exception as exc:  # collected, so the test can count the losers
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_concurrent_updates_of_different_fields_lose_none(r, redis_url):
    _register(r, 1)
    clients = [connect(redis_url) for _ in range(WRITERS)]

    def hammer(i: int) -> None:
        for n in range(ROUNDS):
            registry.update_version(clients[i], 1, **{f"field_{i}": n, f"note_{i}_{n}": True})

    results = _together(WRITERS, hammer)
    assert not [e for e in results if isinstance(e, Exception)], results
    meta = registry.get_version(r, 1)
    for i in range(WRITERS):
        assert meta[f"field_{i}"] == ROUNDS - 1
        missing = [n for n in range(ROUNDS) if f"note_{i}_{n}" not in meta]
        assert not missing, f"writer {i} lost the updates of rounds {missing}"
    assert meta["path"] == "v1" and meta["version"] == 1  # registration fields untouched


def test_update_keeps_the_untouched_fields_exactly(r):
    registry.add_version(
        r,
        1,
        {
            "path": "v1",
            "annotators": [],
            "metrics": {"kl": 0.12345678901234567},
            "feedback": {"first_id": 1733212345678901234},
        },
    )
    before = registry.get_version(r, 1)
    registry.update_version(r, 1, status="rolled_back")
    after = registry.get_version(r, 1)
    assert after == {**before, "status": "rolled_back"}
    assert after["annotators"] == [] and after["metrics"]["kl"] == 0.12345678901234567


def test_update_of_an_unknown_version_raises(r):
    with pytest.raises(KeyError, match="version 7 is not registered"):
        registry.update_version(r, 7, refused="x")


def test_only_one_of_racing_first_publishes_wins(r, redis_url):
    _register(r, WRITERS)
    clients = [connect(redis_url) for _ in range(WRITERS)]
    results = _together(WRITERS, lambda i: registry.set_current(clients[i], i + 1, expected=None))
    winners = [i + 1 for i, res in enumerate(results) if not isinstance(res, Exception)]
    losers = [res for res in results if isinstance(res, Exception)]
    assert len(winners) == 1, results
    assert all(isinstance(e, registry.RegistryConflict) and "exists already" in str(e) for e in losers), losers
    assert registry.current_version(r) == winners[0]
    assert [registry.was_published(r, v) for v in range(1, WRITERS + 1)].count(True) == 1
    assert len(registry.find_events(r, event="published")) == 1


def test_compare_and_set_names_what_it_found(r):
    _register(r, 3)
    with pytest.raises(registry.RegistryConflict, match="no version is current, expected 1"):
        registry.set_current(r, 2, expected=1)
    assert registry.set_current(r, 1, expected=None) is None
    assert registry.set_current(r, 2, expected=1) == 1
    with pytest.raises(registry.RegistryConflict, match="current is 2, expected 1"):
        registry.set_current(r, 3, expected=1)
    with pytest.raises(registry.RegistryConflict, match="unknown version"):
        registry.set_current(r, 9)
    assert registry.current_version(r) == 2 and not registry.was_published(r, 3)


def test_policy_and_reward_tables_are_separate(r):
    _register(r, 2)
    registry.set_current(r, 2)
    assert registry.allocate_reward_version(r) == 1  # its own counter
    registry.add_reward_version(r, 1, {"path": "reward/v1", "kind": "reward_model"})
    with pytest.raises(registry.RegistryConflict, match="reward version 1 is already registered"):
        registry.add_reward_version(r, 1, {"path": "elsewhere"})
    assert registry.current_reward_version(r) is None
    assert registry.set_current_reward(r, 1) is None
    assert registry.current_reward_version(r) == 1 and registry.current_version(r) == 2
    assert [m["path"] for m in registry.list_reward_versions(r)] == ["reward/v1"]
    assert registry.get_reward_version(r, 1)["version"] == 1 and registry.get_reward_version(r, 2) is None
    assert [m["version"] for m in registry.list_versions(r)] == [1, 2]
    # a reward switch is no policy event
    assert [e["version"] for e in registry.find_events(r, event="published")] == [2]
    with pytest.raises(registry.RegistryConflict, match="stale fencing token 5"):
        registry.set_current_reward(r, 1, fencing_token=5)
