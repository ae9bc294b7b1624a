"""A version refused for a transient reason (its smoke test timing out on a busy machine) is retried, and a refused
version the registry makes current again (an operator's rollback to it) is looked at again (service/follower.py).

The busy machine is simulated at the loader's edge: while `busy` is set, loading answers SmokeTestTimeout as the
real smoke test does when the policy cannot answer in time; otherwise the real loader runs (verify, load, smoke
test). A tiny smoke-test timeout would not do: a tiny model can finish its two tokens before the wait begins."""

from __future__ import annotations

import threading

from service import follower
from service.app import create_app
from service.engine import Engine
from service.loader import SmokeTestTimeout, load_version
from store import registry
from tests.conftest import LiveServer
from tests.workers.helpers import make_settings, publish_tiny, wait_for


def test_a_smoke_test_timeout_is_retried_and_does_not_block_a_rollback(r, redis_url, tmp_path, monkeypatch):
    busy = threading.Event()

    def loader(r_, settings_, version, engine=None):
        if busy.is_set():
            raise SmokeTestTimeout(f"smoke test: policy v{version} produced no answer within 60 s")
        return load_version(r_, settings_, version, engine)

    monkeypatch.setattr(follower, "load_version", loader)
    monkeypatch.setattr(follower, "TRANSIENT_RETRY_S", 1.0)
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    engine = Engine(load_version(r, settings, 1), max_batch_size=4)
    app = create_app(settings, redis_url, engine)
    with LiveServer(app) as server:
        ready = lambda: server.client().get("/readyz").json()  # noqa: E731
        busy.set()
        publish_tiny(r, settings, source="ppo", parent=1, expected=1)
        wait_for(lambda: "2" in ready().get("refused_versions", {}), 90, what="the refusal")
        assert ready()["policy_version"] == 1 and "transient" in ready()["refused_versions"]["2"]
        busy.clear()  # the machine is idle again
        wait_for(lambda: ready()["policy_version"] == 2, 90, what="the retry")
        assert "2" not in ready().get("refused_versions", {})
        # refused again, its retry pushed far off, then made current again by an operator: looked at again at once
        monkeypatch.setattr(follower, "TRANSIENT_RETRY_S", 3600.0)
        busy.set()
        publish_tiny(r, settings, source="ppo", parent=2, expected=2)
        wait_for(lambda: "3" in ready().get("refused_versions", {}), 90, what="the refusal of v3")
        registry.set_current(r, 2, expected=3, event="rollback")
        follower_ = app.state.alignd.extras["follower"]
        seen = follower_.syncs  # v2 never stopped serving: wait until the follower has seen the registry change
        wait_for(lambda: follower_.syncs >= seen + 2, 90, what="the follower to see v2 current")
        busy.clear()
        registry.set_current(r, 3, expected=2, event="rollback")
        wait_for(lambda: ready()["policy_version"] == 3, 90, what="the rollback to v3")
