"""Hot-swap in the API (service/follower.py): a published version is served without a failed request, a corrupt or
unloadable checkpoint is refused while the old version keeps serving, and separate API processes converge."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store import registry
from tests.conftest import LiveServer, free_port
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import ADMIN_KEY, chat, make_settings, publish_tiny, start_api, stop, wait_for, wait_http
from training.checkpoint import write_checkpoint
from workers.publish import checkpoint_path


@pytest.fixture
def home(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    return settings


def _served(client: httpx.Client) -> int:
    return int(chat(client).headers["X-Policy-Version"])


def test_swap_under_concurrent_load_fails_no_request(r, redis_url, home):
    engine = Engine(load_version(r, home, 1), max_batch_size=8)
    results: list[tuple[int, int | None]] = []  # (status, version)
    stop_flag = threading.Event()

    def client_loop(server: LiveServer, i: int) -> None:
        with server.client("sk-test-alice") as c:
            n = 0
            while not stop_flag.is_set():
                n += 1
                if (i + n) % 2:
                    resp = chat(c, f"Say a number {n}.", temperature=1.0, max_tokens=12)
                    results.append((resp.status_code, int(resp.headers.get("X-Policy-Version", 0))))
                else:  # streaming: the stream must finish with [DONE] on the version it started on
                    with c.stream(
                        "POST",
                        "/v1/chat/completions",
                        json={
                            "messages": [{"role": "user", "content": "Hello"}],
                            "max_tokens": 12,
                            "stream": True,
                            "temperature": 1.0,
                        },
                    ) as resp:
                        lines = [x for x in resp.iter_lines() if x]
                    ok = resp.status_code == 200 and lines[-1] == "data: [DONE]" and "error" not in lines[-2]
                    fp = json.loads(lines[0][6:])["system_fingerprint"] if ok else "alignd-v0"
                    results.append((200 if ok else resp.status_code, int(fp.rsplit("v", 1)[1])))

    with LiveServer(create_app(home, redis_url, engine)) as server:
        threads = [threading.Thread(target=client_loop, args=(server, i)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 8, 60, what="steady traffic")
            publish_tiny(r, home, source="ppo", parent=1, expected=1)
            wait_for(lambda: sum(v == 2 for _, v in results) >= 8, 60, what="requests served by v2")
        finally:
            stop_flag.set()
            for t in threads:
                t.join(timeout=60)
        assert results and all(status == 200 for status, _ in results), [s for s, _ in results if s != 200]
        versions = [v for _, v in results]
        assert set(versions) == {1, 2} and versions[-1] == 2
        wait_for(lambda: engine.loaded_versions() == [2], 30, what="v1 weights released once drained")


def test_corrupt_or_unloadable_checkpoint_is_refused_and_the_old_version_serves(r, redis_url, home):
    model, tok = tiny_sft_model("gpt2", seed=0, steps=30), tiny_tokenizer()
    engine = Engine(load_version(r, home, 1), max_batch_size=4)
    with LiveServer(create_app(home, redis_url, engine)) as server:
        user, admin = server.client("sk-test-alice"), server.client(ADMIN_KEY)
        # v2: a good checkpoint whose weights are damaged afterwards (sha256 no longer matches the manifest)
        v2 = registry.allocate_version(r)
        path = write_checkpoint(
            lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
            checkpoint_path(home, v2),
            {"version": v2, "parent": 1},
        )
        weights = path / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        registry.add_version(r, v2, {"parent": 1, "source": "ppo", "path": str(path)})
        registry.set_current(r, v2, expected=1)
        wait_for(lambda: "refused_versions" in server.client().get("/readyz").json(), 30, what="the refusal")
        ready = server.client().get("/readyz").json()
        assert ready["status"] == "ready" and ready["policy_version"] == 1
        assert "sha256" in ready["refused_versions"]["2"]
        assert _served(user) == 1
        # v3: files match their manifest, but the model cannot be loaded
        v3 = registry.allocate_version(r)
        path3 = write_checkpoint(
            lambda d: (tok.save_pretrained(d), (d / "config.json").write_text("{not json")),
            checkpoint_path(home, v3),
            {"version": v3, "parent": 1},
        )
        registry.add_version(r, v3, {"parent": 1, "source": "ppo", "path": str(path3)})
        registry.set_current(r, v3, expected=v2)
        wait_for(
            lambda: "3" in server.client().get("/readyz").json().get("refused_versions", {}), 30, what="v3 refused"
        )
        assert _served(user) == 1
        listing = admin.get("/admin/versions").json()
        by_version = {v["version"]: v for v in listing["data"]}
        assert "sha256" in by_version[2]["refused"] and by_version[3]["refused"]
        assert set(listing["serving"]["refused"]) == {"2", "3"} and listing["serving"]["current"] == 1
        assert {e["version"] for e in registry.find_events(r, event="refused")} == {2, 3}
        # the operator points the registry back at v1: a refused version cannot be rolled back to
        assert admin.post("/admin/rollback", json={"version": 2}).status_code == 409
        assert admin.post("/admin/rollback", json={"version": 1}).json()["current"] == 1
        assert registry.current_version(r) == 1 and _served(user) == 1


def test_two_api_processes_converge_on_publish_and_rollback(r, redis_url, home, tmp_path):
    ports = [free_port(), free_port()]
    procs = [start_api(home, p, tmp_path / f"api{i}.log") for i, p in enumerate(ports)]
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:
            wait_http(url)
        clients = [
            httpx.Client(base_url=u, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30) for u in urls
        ]
        assert [_served(c) for c in clients] == [1, 1]
        publish_tiny(r, home, source="ppo", parent=1, expected=1)
        t0 = time.monotonic()
        wait_for(
            lambda: all(c.get("/readyz").json()["policy_version"] == 2 for c in clients),
            30,
            interval=0.05,
            what="both processes on v2",
        )
        converge_s = time.monotonic() - t0
        assert [_served(c) for c in clients] == [2, 2] and converge_s < 15
        rolled = clients[0].post("/admin/rollback", json={"version": 1})
        assert rolled.status_code == 200 and rolled.json() == {
            "object": "rollback",
            "current": 1,
            "previous": 2,
            "changed": True,
        }
        wait_for(
            lambda: all(c.get("/readyz").json()["policy_version"] == 1 for c in clients),
            30,
            what="both processes back on v1",
        )
        assert [_served(c) for c in clients] == [1, 1]
        assert registry.find_events(r, event="rollback", version=1)
        assert clients[1].post("/admin/rollback", json={"version": 99}).status_code == 404
    finally:
        for p in procs:
            stop(p)
