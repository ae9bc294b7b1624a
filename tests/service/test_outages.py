"""Outages injected for real around a serving API: Redis killed -9 under chat and feedback load and restarted, an
`alignd serve` process killed -9 mid-stream and restarted, `alignd serve` started on a policy that fails its smoke
test. Each test says what the user sees, what is lost and how long recovery takes (printed; run with -s).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest

from core.redis_server import EmbeddedRedis, free_port
from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store import feedback as fb
from store.client import connect
from store.completions import get_completion
from tests.conftest import LiveServer
from tests.service.test_faults import _bad_vocab_checkpoint
from tests.utils.serving import USER_KEY, publish_tiny
from tests.workers.helpers import ROOT, env_for, make_settings, start_api, stop, wait_for, wait_http
from workers.publish import publish_version

MSG = [{"role": "user", "content": "Hello"}]
pytestmark = pytest.mark.slow


class Load:
    """Chat and feedback clients hammering a server from threads, keeping every answer."""

    def __init__(self, url: str, completion_ids: list[str]):
        self.url, self.cids = url, completion_ids
        self.answers: list[tuple[str, int, str | None, float]] = []  # (kind, status, error code, time)
        self.acked_feedback: list[str] = []
        self.acked_chats: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._chat) for _ in range(2)]
        self.threads += [threading.Thread(target=self._feedback) for _ in range(2)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=60)

    def _keep(self, kind: str, resp: httpx.Response) -> None:
        code = resp.json()["error"]["code"] if resp.status_code >= 400 else None
        self.answers.append((kind, resp.status_code, code, time.monotonic()))

    def _chat(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as c:
            while not self.stopping.is_set():
                resp = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
                self._keep("chat", resp)
                if resp.status_code == 200:
                    self.acked_chats.append(resp.json()["id"])

    def _feedback(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as c:
            n = 0
            while not self.stopping.is_set():
                n += 1
                fid = f"fb-{uuid.uuid4().hex}"
                resp = c.post(
                    "/v1/feedback",
                    json={
                        "completion_id": self.cids[n % len(self.cids)],
                        "type": "thumbs",
                        "choice": 0,
                        "value": ("up", "down")[n % 2],
                        "feedback_id": fid,
                    },
                )
                self._keep("feedback", resp)
                if 200 <= resp.status_code < 300:
                    self.acked_feedback.append(fid)

    def ok_since(self, t: float) -> set[str]:
        return {kind for kind, status, _, at in list(self.answers) if at > t and 200 <= status < 300}

    def unavailable_since(self, t: float) -> set[str]:
        return {kind for kind, status, _, at in list(self.answers) if at > t and status == 503}


def test_redis_killed_under_load_answers_503_then_recovers_keeping_acknowledged_feedback(tmp_path):
    redis_dir = tmp_path / "redis"  # a private Redis: the session's must not be killed
    server = EmbeddedRedis(redis_dir)
    url = server.start()
    restarted = None
    try:
        settings = make_settings(tmp_path / "home", url, chat_rate_per_minute=100_000)
        publish_tiny(url, settings)
        engine = Engine(load_version(connect(url), settings, 1))
        with LiveServer(create_app(settings, url, engine)) as live:
            with live.client(USER_KEY) as http:
                cids = [
                    http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2}).json()["id"]
                    for _ in range(3)
                ]
            with Load(live.url, cids) as load:
                wait_for(lambda: load.ok_since(0) == {"chat", "feedback"}, 30, what="steady load")
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                killed = time.monotonic()
                wait_for(lambda: load.unavailable_since(killed) == {"chat", "feedback"}, 30, what="503s")
                time.sleep(1.0)  # a second more of load against the dead store
                restarted = EmbeddedRedis(redis_dir, port=server.port)  # same port and data: the AOF is replayed
                restarted.start()
                back = time.monotonic()
                wait_for(lambda: load.ok_since(back) == {"chat", "feedback"}, 30, interval=0.02, what="recovery")
                recovered_s = (
                    max(
                        min(at for kind, s, _, at in load.answers if at > back and s < 300 and kind == k)
                        for k in ("chat", "feedback")
                    )
                    - back
                )
        statuses = {(kind, status, code) for kind, status, code, _ in load.answers}
        assert all(200 <= s < 300 or s == 503 for _, s, _ in statuses), statuses  # never a 500
        assert {code for kind, s, code in statuses if s == 503 and kind == "chat"} == {"redis_unavailable"}
        # one code for both; feedback's message adds that a retry with the same feedback_id settles an unknown outcome
        assert {code for kind, s, code in statuses if s == 503 and kind == "feedback"} == {"redis_unavailable"}
        r = connect(url)
        lost = [fid for fid in load.acked_feedback if fb.get_feedback(r, fid) is None]
        lost_chats = [cid for cid in load.acked_chats if get_completion(r, cid) is None]
        assert not lost and not lost_chats, (lost, lost_chats)
        print(
            f"\nredis away: {len(load.answers)} answers, "
            f"{sum(s == 503 for _, s, _, _ in load.answers)} 503s, {len(load.acked_feedback)} acknowledged "
            f"feedback events all kept; recovered {recovered_s:.2f} s after Redis was back"
        )
    finally:
        for s in (restarted, server):
            if s is not None:
                s.stop()


def test_serve_killed_mid_stream_leaves_no_partial_record_and_a_restart_serves(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(redis_url, settings)  # untrained: greedy decoding runs to max_tokens
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_api(settings, port, tmp_path / "api.log")
    try:
        wait_http(base)
        lines: list[str] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30) as c:
            with pytest.raises(httpx.HTTPError):  # the client sees a broken stream (incomplete chunked body)
                with c.stream(
                    "POST",
                    "/v1/chat/completions",
                    json={"messages": MSG, "max_tokens": 200, "temperature": 0, "stream": True},
                ) as s:
                    for line in s.iter_lines():
                        lines.append(line)
                        if len([x for x in lines if x]) == 4:
                            stop(proc, signal.SIGKILL)
        assert lines and "data: [DONE]" not in lines
        cid = json.loads(lines[0][6:])["id"]
        assert get_completion(r, cid) is None  # recorded whole at the end or not at all: here, not at all
        t0 = time.monotonic()
        proc = start_api(settings, port, tmp_path / "api2.log")
        wait_http(base)
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=30) as c:
            resp = c.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        assert resp.status_code == 200
        print(f"\nserve killed mid-stream: restarted and serving in {time.monotonic() - t0:.1f} s")
    finally:
        stop(proc)


def test_serve_refuses_to_start_on_a_policy_failing_its_smoke_test(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_version(r, settings, _bad_vocab_checkpoint, {"source": "test", "parent": None})
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "alignd.cli", "serve", "--port", str(free_port())],
        cwd=ROOT,
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = " ".join((done.stdout + done.stderr).split())
    assert done.returncode != 0, out
    assert "cannot serve policy v1" in out and "smoke test" in out and "IndexError" in out, out
    print(f"\nserve on a failing policy: exit {done.returncode} after {time.monotonic() - t0:.1f} s")
