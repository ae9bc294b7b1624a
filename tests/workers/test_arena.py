"""Arena mode: two-choice requests get one answer from the current version and one from its parent, votes give a
live win rate, and a version that loses to its parent is rolled back automatically (workers.arena.check_arena)."""

from __future__ import annotations

from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store.completions import get_completion
from tests.conftest import LiveServer
from tests.workers.helpers import ADMIN_KEY, chat, make_settings, publish_tiny, wait_for
from workers.arena import check_arena
from workers.cycle_config import CycleConfig


def test_losing_to_the_parent_in_the_arena_rolls_back(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url, arena=True, arena_rollback_below=0.35)
    publish_tiny(r, settings)
    engine = Engine(load_version(r, settings, 1), max_batch_size=8)
    app = create_app(settings, redis_url, engine)
    extras = app.state.alignd.extras
    with LiveServer(app) as server:
        alice, admin = server.client("sk-test-alice"), server.client(ADMIN_KEY)
        publish_tiny(r, settings, source="ppo", parent=1, expected=1)
        wait_for(lambda: extras.get("arena_pair") == (2, 1), 30, what="the arena pair (current, parent)")
        assert engine.loaded_versions() == [1, 2]
        for i in range(5):
            resp = chat(alice, f"Say a number {i}.", n=2, temperature=1.0)
            record = get_completion(r, resp.json()["id"])
            versions = [c.version for c in record.choices]
            assert sorted(versions) == [1, 2] and record.arena
            vote = alice.post(
                "/v1/feedback", json={"completion_id": record.id, "type": "pairwise", "winner": versions.index(1)}
            )  # the parent wins every time
            assert vote.status_code == 201
        assert check_arena(r, settings, CycleConfig(arena_min_votes=6))["status"] == "watching"  # too few votes
        live = next(v for v in admin.get("/admin/versions").json()["data"] if v["version"] == 2)["live_win_rate"]
        assert live["vs"] == 1 and live["win_rate"] == 0.0 and live["votes"] == 5
        assert admin.get("/admin/stats").json()["pairs"]["2_vs_1"]["losses"] == 5
        out = check_arena(r, settings, CycleConfig(arena_min_votes=5))
        assert out["status"] == "rolled_back" and out["to"] == 1
        wait_for(lambda: chat(alice).json()["system_fingerprint"] == "alignd-v1", 30, what="v1 served again")
        wait_for(lambda: extras.get("arena_pair") is None, 10, what="no arena without a parent")
        listing = admin.get("/admin/versions").json()
        assert listing["current"] == 1
        assert next(v for v in listing["data"] if v["version"] == 2)["status"] == "rolled_back"
