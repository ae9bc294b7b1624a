"""The chat API through real HTTP and a real Redis, with the `openai` client, for GPT-2 and Llama tiny models."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from service.schemas import ChatCompletionChunk, ChatCompletionResponse
from store.completions import get_completion
from tests.conftest import LiveServer
from tests.utils.serving import ADMIN_KEY, USER_KEY, make_settings, served_app

MSG = [{"role": "user", "content": "Say a number."}]


@pytest.fixture(params=["gpt2", "llama"])
def server(request, r, redis_url, tmp_path):
    settings = make_settings(tmp_path, max_prompt_tokens=64, max_new_tokens=32, chat_rate_per_minute=1000)
    with LiveServer(served_app(redis_url, settings, request.param)) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)


def test_openai_client_non_streaming_n2_is_recorded(client, r):
    resp = client.chat.completions.create(model="alignd", messages=MSG, n=2, max_tokens=8, seed=3)
    assert resp.id.startswith("chatcmpl-") and resp.system_fingerprint == "alignd-v1"
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
    assert 0 < resp.usage.completion_tokens <= 16 and resp.usage.prompt_tokens > 0
    rec = get_completion(r, resp.id)
    assert rec is not None and rec.user == "alice" and rec.version == 1 and rec.messages == MSG
    assert [c.text for c in rec.choices] == [c.message.content for c in resp.choices]
    assert rec.params["seed"] == 3 and rec.params["n"] == 2


def test_openai_client_streaming_matches_non_streaming(client, r):
    kw = dict(model="alignd", messages=MSG, max_tokens=10, seed=11, temperature=0.8)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert get_completion(r, chunks[0].id) is not None


def test_sse_ends_with_done_and_version_header(server):
    with server.client(USER_KEY) as http:
        with http.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, "max_tokens": 4}) as s:
            assert s.status_code == 200 and s.headers["x-policy-version"] == "1"
            lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[0][6:])


def test_openapi_describes_exactly_what_is_sent(server):
    """The typed responses: real answers validate against the published schemas, with no key beyond them."""
    with server.client(USER_KEY) as http:
        spec = http.get("/openapi.json").json()
        answers = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
        assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
        assert "ChatCompletionChunk" in json.dumps(answers["200"]["content"]["text/event-stream"]["schema"])
        assert answers["503"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
        whole = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, "n": 2}).json()
        with http.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, "max_tokens": 4}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line and line != "data: [DONE]"]
    schemas = spec["components"]["schemas"]
    assert set(whole) == set(schemas["ChatCompletionResponse"]["properties"])
    assert ChatCompletionResponse.model_validate(whole).choices[1].index == 1
    for chunk in chunks:  # the wire format of OpenAI: no usage key but in the last chunk, deltas only what changed
        typed = ChatCompletionChunk.model_validate(chunk)
        assert ("usage" in chunk) == (typed.choices == [])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_ready_metrics(server):
    with server.client(USER_KEY) as http:
        models = http.get("/v1/models").json()
        assert models["data"][0]["id"] == "alignd-v1"
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["policy_version"] == 1
        http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        text = http.get("/metrics").text
        assert "alignd_chat_requests_total" in text and "alignd_policy_version 1.0" in text


BAD_BODIES = [
    ({"messages": []}, 422),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422),
    ({"messages": [{"role": "user", "content": ""}]}, 422),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 422),
    ({"messages": MSG, "n": 5}, 422),
    ({"messages": MSG, "n": 0}, 422),
    ({"messages": MSG, "max_tokens": 0}, 422),
    ({"messages": MSG, "max_tokens": 33}, 422),
    ({"messages": MSG, "temperature": 3}, 422),
    ({"messages": MSG, "top_p": 0}, 422),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 422),
    ({"messages": "hello"}, 422),
    ({"messages": MSG, "user": "has space"}, 422),
    ({"messages": MSG, "user": "k" * 65}, 422),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, 413),
]


@pytest.mark.parametrize("body,status", BAD_BODIES)
def test_bad_input_gets_openai_error_and_records_nothing(server, r, body, status):
    before = r.dbsize()
    with server.client(USER_KEY) as http:
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"] and "code" in err
    assert not [k for k in r.keys("alignd:completion:*")]
    assert r.dbsize() - before <= 1  # at most the rate-limit counter of this key


def test_auth_and_body_limits(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.post("/v1/chat/completions", json={"messages": MSG}).status_code == 401
        bad = http.post("/v1/chat/completions", json={"messages": MSG}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models", headers={"Authorization": f"Basic {USER_KEY}"}).status_code == 401
        big = http.post(
            "/v1/chat/completions",
            content=b"{" + b" " * 1_100_000 + b"}",
            headers={"Authorization": f"Bearer {USER_KEY}", "Content-Type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        junk = http.post(
            "/v1/chat/completions",
            content=b"\xff\xfe not json",
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
        )
        assert junk.status_code == 400 and junk.json()["error"]["type"] == "invalid_request_error"


def test_rate_limit_429(r, redis_url, tmp_path):
    settings = make_settings(tmp_path, chat_rate_per_minute=3)
    with LiveServer(served_app(redis_url, settings)) as live, live.client(USER_KEY) as http:
        codes = [
            http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1}).status_code for _ in range(5)
        ]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        limited = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 1})
        assert limited.json()["error"]["type"] == "rate_limit_error" and int(limited.headers["retry-after"]) > 0


def test_generated_keys_when_none_configured(redis_url, tmp_path):
    from core.config import Settings
    from service.auth import load_keyring

    settings = Settings(home=tmp_path)
    first = load_keyring(settings)
    again = load_keyring(settings)
    assert first.generated and not again.generated
    assert first.users == again.users and first.admin_key == again.admin_key
    assert (tmp_path / "keys.json").stat().st_mode & 0o077 == 0


def test_the_engine_decodes_on_its_configured_threads_beside_the_registry_follower(r, redis_url, tmp_path):
    """The served process's engine thread keeps its own torch thread count although the registry follower, started
    with it, sets one thread for its loads (core/threads.py): /metrics reports what the decode steps ran on."""
    settings = make_settings(tmp_path, max_new_tokens=8, chat_rate_per_minute=1000)
    app = served_app(redis_url, settings)
    app.state.alignd.engine.threads = 2
    before = torch.get_num_threads()
    try:
        with LiveServer(app) as live, live.client(USER_KEY) as http:
            follower = app.state.alignd.extras["follower"]
            wait_until = time.monotonic() + 10
            while follower.syncs == 0 and time.monotonic() < wait_until:  # it has set its count and synced once
                time.sleep(0.05)
            answer = http.post("/v1/chat/completions", json={"model": "alignd", "max_tokens": 4, "messages": MSG})
            assert answer.status_code == 200, answer.text
            scraped = http.get("/metrics").text
        assert "alignd_engine_torch_threads 2.0" in scraped
    finally:
        torch.set_num_threads(before)
