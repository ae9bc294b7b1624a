"""Overload and abuse over real HTTP and a real Redis: chunked bodies over the limit, more clients than the server
admits, more concurrent requests than Redis connections, and a Redis that refuses writes."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import httpx
import pytest

from core.config import Settings
from service.admission import admission
from service.app import create_app
from tests.conftest import LiveServer
from tests.store.test_feedback import add_completion
from tests.utils.serving import ADMIN_KEY, OTHER_KEY, USER_KEY, make_settings, served_app

MSG = [{"role": "user", "content": "Say a number."}]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def send_chunked(port: int, total: int, chunk: int = 64 * 1024, headers: str = "") -> tuple[bytes, int]:
    """POST a chunked body of `total` bytes with a raw socket, stopping as soon as the server answers; returns (the
    answer's first bytes, bytes of body sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST /v1/feedback HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    block, sent = b"{" + b" " * (chunk - 1), 0
    try:
        while sent < total and not select.select([s], [], [], 0)[0]:
            s.sendall(f"{len(block):x}\r\n".encode() + block + b"\r\n")
            sent += len(block)
        if sent >= total:
            s.sendall(b"0\r\n\r\n")
        return s.recv(65536), sent
    except (BrokenPipeError, ConnectionResetError):
        return s.recv(65536), sent
    finally:
        s.close()


@pytest.fixture
def api(tmp_path, redis_url, r):
    settings = make_settings(tmp_path, max_body_bytes=1_000_000, redis_max_connections=4)
    with LiveServer(create_app(settings, redis_url, engine=None)) as live:
        yield live


def test_a_chunked_body_over_the_limit_is_413_before_auth_without_being_held(api):
    send_chunked(api.port, 2_000_000)  # warm up: the first request allocates what every request shares
    before = rss_bytes()
    answer, sent = send_chunked(api.port, 50_000_000)  # no Authorization header at all
    grown = rss_bytes() - before
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"body_too_large" in answer
    assert sent < 20_000_000  # answered while the client was still sending: the rest was never read
    assert grown < 10_000_000, f"the server grew by {grown / 1e6:.1f} MB"


def test_a_chunked_body_under_the_limit_is_read_and_served(api):
    answer, _ = send_chunked(api.port, 64 * 1024, headers=f"Authorization: Bearer {USER_KEY}\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]  # read whole and parsed: invalid JSON, not a 413
    assert b"invalid_json" in answer


def test_more_concurrent_requests_than_redis_connections_wait_for_one(api):
    """300 clients against a pool of 4 connections: every request is answered by the route (404: no such
    completion), none with a 503 that blames Redis."""

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=300)
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        async with httpx.AsyncClient(base_url=api.url, limits=limits, headers=headers, timeout=60) as http:
            body = {"completion_id": "nope", "type": "thumbs", "choice": 0, "value": "up"}
            answers = await asyncio.gather(*(http.post("/v1/feedback", json=body) for _ in range(300)))
        return [a.status_code for a in answers]

    assert set(asyncio.run(main())) == {404}


def test_a_redis_that_refuses_writes_is_a_503_not_a_500(api, r):
    """Out of memory (maxmemory under what is used, noeviction): the vote is refused with 503, and nothing is lost
    that was acknowledged."""
    add_completion(r, "c", n=1)
    r.set("filler", "x" * 100_000)
    r.config_set("maxmemory", str(r.info("memory")["used_memory"] - 50_000))
    try:
        with api.client(USER_KEY) as http:
            body = {"completion_id": "c", "type": "thumbs", "choice": 0, "value": "up"}
            answer = http.post("/v1/feedback", json=body)
            models = http.get("/v1/models")
    finally:
        r.config_set("maxmemory", "0")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "redis_unavailable", answer.text
    assert "OOM" in answer.json()["error"]["message"] and answer.headers["retry-after"] == "1"
    assert models.status_code == 200  # reads go on


@pytest.fixture
def busy(tmp_path, redis_url, r):
    settings = Settings(
        home=tmp_path,
        api_keys=f"{USER_KEY}:alice,{OTHER_KEY}:bob,k3:carol,k4:dave",
        admin_key=ADMIN_KEY,
        max_inflight=16,
        max_new_tokens=256,
        chat_rate_per_minute=10_000,
        key_chat_rate_per_minute=10_000,
    )
    app = served_app(redis_url, settings)
    with LiveServer(app) as live:
        yield live, app.state.alignd


def test_clients_over_capacity_get_429_or_503_at_once_and_the_admitted_are_served(busy):
    live, state = busy
    keys = [USER_KEY, OTHER_KEY, "k3", "k4"]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, float, dict]:
        t0 = time.monotonic()
        body = {"messages": MSG, "max_tokens": 64, "stream": i % 2 == 0}
        a = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {keys[i % 4]}"})
        return a.status_code, time.monotonic() - t0, dict(a.headers)

    async def main():
        async with httpx.AsyncClient(base_url=live.url, limits=httpx.Limits(max_connections=200), timeout=120) as h:
            return await asyncio.gather(*(one(h, i) for i in range(200)))

    answers = asyncio.run(main())
    codes = [c for c, _, _ in answers]
    assert set(codes) <= {200, 429, 503} and codes.count(200) >= 16, codes
    refused = [(c, dt, h) for c, dt, h in answers if c != 200]
    assert refused and all(h.get("retry-after") == "1" for _, _, h in refused)
    served = sorted(dt for c, dt, _ in answers if c == 200)
    assert max(dt for _, dt, _ in refused) < served[len(served) // 2]  # refusals come before typical answers
    assert state.extras["admission"].snapshot()["sequences"] == 0  # every admitted request gave its room back


def test_one_key_cannot_take_more_than_its_share(busy):
    live, state = busy
    adm = admission(state)
    held = [adm.admit("alice", 4, 4) for _ in range(2)]  # alice holds her share: 8 of 16
    with live.client(USER_KEY) as http:
        mine = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    with live.client(OTHER_KEY) as http:
        theirs = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
    for t in held:
        t.release()
    assert mine.status_code == 429 and mine.json()["error"]["code"] == "too_many_inflight"
    assert theirs.status_code == 200
    with live.client(ADMIN_KEY) as http:
        too_many_tokens = [adm.admit("admin", 1, 16_384)]
        r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        too_many_tokens[0].release()
    assert r.status_code == 429 and "tokens" in r.json()["error"]["message"]


def test_a_client_that_leaves_gives_its_room_back(busy):
    live, state = busy
    with live.client(USER_KEY) as http:
        body = {"messages": MSG, "stream": True, "max_tokens": 256, "temperature": 0}
        seen = []
        for _ in range(10):  # the tiny model can finish its 256 tokens before the check below: then again
            with http.stream("POST", "/v1/chat/completions", json=body) as s:
                next(s.iter_lines())
                seen.append(admission(state).snapshot()["sequences"])
                if seen[-1] == 1:
                    break  # the stream is closed mid-way
        assert seen[-1] == 1, seen
        # a non-streaming request abandoned by its client too
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 64, "n": 2}, timeout=0.05)
    deadline = time.monotonic() + 10
    while admission(state).snapshot()["sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert admission(state).snapshot() == {"sequences": 0, "keys": 0, "max_inflight": 16}
