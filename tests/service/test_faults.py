"""Fault containment and cancellation in the engine and the chat API, with real faults injected into a real model
(a forward pre-hook that raises or hangs), real HTTP and a real Redis.

What must hold: a failing forward fails exactly the sequences it was computing, within a bound, while every other
batch and every later request is served; a client that leaves frees its engine row before the next decode step; a
policy whose smoke test fails or hangs is refused and the old version keeps serving.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from service.app import create_app
from service.engine import Engine, EngineError, Policy, SamplingParams
from service.loader import PolicyRejected, load_version, smoke_test
from store import registry
from store.client import connect
from store.completions import get_completion
from tests.conftest import LiveServer
from tests.utils.serving import USER_KEY, make_settings, publish_tiny
from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.checkpoint import write_checkpoint
from training.model import build_model, tiny_config
from workers.publish import checkpoint_path, publish_version

MSG = [{"role": "user", "content": "Hello"}]
LONG = SamplingParams(temperature=0, max_tokens=1000)  # greedy on a random tiny model: no EOS, runs to the limit


class Fault:
    """Injected into a model as a forward pre-hook: raises (or blocks until released, or only sleeps `delay` seconds)
    on prefill forwards (more than one position) or on decode forwards (one position) once `after` of them have run,
    while `armed`."""

    def __init__(self, model, on: str = "prefill", after: int = 0, hang: bool = False, delay: float = 0.0):
        self.on, self.after, self.hang, self.delay, self.armed, self.seen = on, after, hang, delay, True, 0
        self.release = threading.Event()
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        width = (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]
        if not self.armed or (width == 1) != (self.on == "decode"):
            return None
        self.seen += 1
        if self.seen <= self.after:
            return None
        if self.hang:
            self.release.wait(60)
            return None
        if self.delay:
            time.sleep(self.delay)
            return None
        raise RuntimeError(f"injected {self.on} fault")


def _policy(version: int, seed: int = 0, context: int = 2048) -> Policy:
    return Policy(
        version=version,
        model=tiny_model("gpt2", seed=seed, context=context),
        tokenizer=tiny_tokenizer(),
        context=context,
    )


def _drain(handle, timeout: float = 30.0) -> tuple[list[str], str, str]:
    """(deltas, last kind, its text or finish reason) of a sync handle, failing the test if it never ends."""
    deltas, deadline = [], time.monotonic() + timeout
    while True:
        event = handle.squeue.get(timeout=max(0.01, deadline - time.monotonic()))
        if event.kind == "delta":
            deltas.append(event.text)
        else:
            return deltas, event.kind, event.text or event.finish_reason


def _until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.parametrize("stage", ["prefill", "decode"])
def test_a_failing_forward_fails_only_its_sequences(stage):
    good, bad = _policy(1, seed=0), _policy(2, seed=1)
    fault = Fault(bad.model, on=stage, after=3 if stage == "decode" else 0)
    engine = Engine(good, max_batch_size=8)
    engine.pin({2})  # kept loaded beside the current version, as an arena parent is
    engine.add_policy(bad)
    engine.start()
    try:
        healthy = engine.submit(MSG, SamplingParams(temperature=0, max_tokens=200), version=1)
        _until(lambda: engine.running() == 1, 10, what="the healthy request running")
        t0 = time.monotonic()
        victims = [engine.submit(MSG, SamplingParams(temperature=0, max_tokens=60), version=2) for _ in range(2)]
        outcomes = [_drain(v) for v in victims]
        failed_in = time.monotonic() - t0
        for deltas, kind, text in outcomes:
            assert kind == "error" and f"injected {stage} fault" in text and stage in text
            assert (len(deltas) > 0) == (stage == "decode")  # a decode fault comes after the first tokens
        assert failed_in < 5
        text, finish, n = healthy.wait(timeout=30)  # the other version's batch never noticed
        assert finish == "length" and n == 200
        assert engine.failed == 2
        later = engine.generate(MSG, SamplingParams(temperature=0, max_tokens=5), version=1, timeout=30)
        assert later[2] == 5
        with pytest.raises(EngineError, match=f"injected {stage} fault"):  # sync callers get the error raised
            engine.generate(MSG, SamplingParams(temperature=0, max_tokens=60), version=2, timeout=30)
        fault.armed = False  # the faulty version serves again once its forward works: no state was left broken
        assert engine.generate(MSG, SamplingParams(temperature=0, max_tokens=5), version=2, timeout=30)[2] == 5
    finally:
        engine.stop()


def test_cancel_drops_running_rows_before_the_next_step_and_queued_ones_never_start():
    engine = Engine(_policy(1), max_batch_size=8)
    sizes: list[int] = []  # batch size of every decode step
    engine.on_step = sizes.append
    queued = engine.submit(MSG, LONG)
    engine.cancel(queued)  # before the scheduler runs at all
    engine.start()
    try:
        assert _drain(queued)[1:] == ("done", "cancelled") and engine.steps == 0
        handles = [engine.submit(MSG, LONG) for _ in range(3)]
        _until(lambda: engine.running() == 3 and engine.steps > 5, 20, what="three running sequences")
        mark = len(sizes)
        engine.cancel(handles[0])
        engine.cancel(handles[1])
        _until(lambda: engine.running() == 1, 5, what="the cancelled rows dropped")
        assert sum(n == 3 for n in sizes[mark:]) <= 1  # at most the step already under way when cancel was called
        assert engine.cancelled == 3
        engine.cancel(handles[2])
        _until(lambda: engine.running() == 0, 5, what="the last row dropped")
        assert engine.cancelled == 4
    finally:
        engine.stop()


def test_waits_are_bounded_and_a_failing_or_hanging_smoke_test_refuses_the_policy():
    hanging = _policy(1)
    fault = Fault(hanging.model, on="prefill", hang=True)
    engine = Engine(hanging)
    engine.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            engine.generate(MSG, SamplingParams(max_tokens=4), timeout=0.5)
        assert time.monotonic() - t0 < 2
    finally:
        fault.release.set()
        engine.stop()
    fault.release.clear()
    t0 = time.monotonic()
    with pytest.raises(PolicyRejected, match="no answer within 1"):
        smoke_test(hanging, timeout_s=1.0)
    assert time.monotonic() - t0 < 4
    fault.release.set()
    broken = _policy(2)
    Fault(broken.model, on="decode")
    with pytest.raises(PolicyRejected, match="injected decode fault"):
        smoke_test(broken, timeout_s=10)


@pytest.fixture
def faulty_server(r, redis_url, tmp_path):
    """A live API over a policy with an (unarmed) injectable fault, and a 2 s request deadline."""
    settings = make_settings(tmp_path, max_new_tokens=1000, chat_rate_per_minute=10_000, request_timeout_s=2.0)
    policy = _policy(1)
    fault = Fault(policy.model, on="decode", after=2)
    fault.armed = False
    engine = Engine(policy, max_batch_size=8)
    with LiveServer(create_app(settings, redis_url, engine)) as live:
        yield live, engine, fault


def _stream_lines(http: httpx.Client, **body) -> list[str]:
    with http.stream("POST", "/v1/chat/completions", json={"messages": MSG, "stream": True, **body}) as s:
        assert s.status_code == 200
        return [line for line in s.iter_lines() if line]


def test_api_answers_engine_errors_and_timeouts_with_503_and_error_chunks(faulty_server, r):
    live, engine, fault = faulty_server
    with live.client(USER_KEY) as http:
        fault.armed = True
        t0 = time.monotonic()
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 50, "temperature": 0})
        assert resp.status_code == 503 and time.monotonic() - t0 < 5
        err = resp.json()["error"]
        assert err["code"] == "engine_error" and "injected decode fault" in err["message"]
        assert err["type"] == "service_unavailable" and resp.headers["Retry-After"]
        fault.seen = 0
        lines = _stream_lines(http, max_tokens=50, temperature=0)
        last = json.loads(lines[-1][6:])
        assert "data: [DONE]" not in lines and last["error"]["code"] == "engine_error"
        assert any(json.loads(x[6:]).get("choices", [{}])[0].get("delta", {}).get("content") for x in lines[:-1])
        assert get_completion(r, json.loads(lines[0][6:])["id"]) is None  # a failed stream is not recorded

        fault.armed, fault.hang, fault.seen = True, True, 0  # the engine thread blocks: the deadline answers
        t0 = time.monotonic()
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 50, "temperature": 0})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_timeout"
        assert 1.5 < time.monotonic() - t0 < 6
        fault.armed = False
        fault.release.set()
        ok = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 5, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5
        _until(lambda: engine.running() == 0, 5, what="the timed-out sequence cancelled")
        metrics = http.get("/metrics").text
        assert 'alignd_engine_failed_sequences_total{stage="decode"}' in metrics


def _metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def slow_server(r, redis_url, tmp_path):
    """A live API whose decode steps take 20 ms each (1000 tokens: 20 s) and whose request deadline (60 s) is far
    away: only the client leaving can end a long request early. A tiny model at full speed can finish 1000 tokens
    before a loaded client has read its first chunks, which would leave nothing to cancel."""
    settings = make_settings(tmp_path, max_new_tokens=1000, chat_rate_per_minute=10_000, request_timeout_s=60.0)
    policy = _policy(1)
    Fault(policy.model, on="decode", delay=0.02)
    engine = Engine(policy, max_batch_size=8)
    with LiveServer(create_app(settings, redis_url, engine)) as live:
        yield live, engine


def test_a_client_that_disconnects_frees_its_rows(slow_server):
    live, engine = slow_server
    long = {"messages": MSG, "max_tokens": 1000, "temperature": 0}
    with live.client(USER_KEY) as http:
        cancelled = _metric(http, "alignd_engine_cancelled_sequences_total")
        for _ in range(2):  # streaming: read a few chunks, then hang up
            with httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {USER_KEY}"}) as c:
                with c.stream("POST", "/v1/chat/completions", json={**long, "stream": True}) as s:
                    for i, _line in enumerate(s.iter_lines()):
                        if i > 6:
                            break
                    assert engine.running() >= 1
        _until(lambda: engine.running() == 0, 3, what="streamed rows cancelled")
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up while the server generates
            httpx.post(
                f"{live.url}/v1/chat/completions",
                json=long,
                timeout=0.5,
                headers={"Authorization": f"Bearer {USER_KEY}"},
            )
        _until(lambda: engine.running() == 0, 3, what="the non-streaming row cancelled")
        assert _metric(http, "alignd_engine_cancelled_sequences_total") - cancelled == 3
        assert _metric(http, "alignd_engine_running_sequences") == 0
        assert http.post("/v1/chat/completions", json={**long, "max_tokens": 3}).status_code == 200


def _bad_vocab_checkpoint(d):
    """A checkpoint that loads and passes its sha256 check but whose forward raises on any real prompt: an embedding
    of 8 rows under the 300-token tokenizer (IndexError in the first forward)."""
    tok = tiny_tokenizer()
    cfg = tiny_config("gpt2", 8, n_layer=1, d_model=32, n_head=2, context=256)
    build_model(cfg, 0).save_pretrained(d)
    tok.save_pretrained(d)


def test_a_policy_failing_its_smoke_test_is_refused_and_the_old_one_serves(r, redis_url, tmp_path):
    settings = make_settings(tmp_path, redis_url=redis_url, poll_seconds=0.2)
    publish_tiny(redis_url, settings)
    engine = Engine(load_version(r, settings, 1))
    with LiveServer(create_app(settings, redis_url, engine)) as live, live.client(USER_KEY) as http:
        publish_version(
            connect(redis_url), settings, _bad_vocab_checkpoint, {"source": "test", "parent": 1}, expected_current=1
        )
        refused = _until(lambda: http.get("/readyz").json().get("refused_versions"), 30, what="the refusal")
        assert "smoke test" in refused["2"] and "IndexError" in refused["2"]
        ok = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        assert ok.status_code == 200 and ok.headers["X-Policy-Version"] == "1"
        assert registry.get_version(r, 2)["refused"] == refused["2"]


def test_a_deleted_model_folder_keeps_serving_from_memory_and_a_missing_one_is_refused(r, redis_url, tmp_path):
    settings = make_settings(tmp_path, redis_url=redis_url, poll_seconds=0.2)
    publish_tiny(redis_url, settings)
    engine = Engine(load_version(r, settings, 1))
    with LiveServer(create_app(settings, redis_url, engine)) as live, live.client(USER_KEY) as http:
        shutil.rmtree(settings.checkpoint(registry.get_version(r, 1)["path"]))
        assert http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3}).status_code == 200
        model, tok = tiny_model("gpt2", seed=3), tiny_tokenizer()
        v2 = registry.allocate_version(r)
        path = write_checkpoint(
            lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
            checkpoint_path(settings, v2),
            {"version": v2, "parent": 1},
        )
        registry.add_version(r, v2, {"parent": 1, "source": "test", "path": str(path)})
        shutil.rmtree(path)  # gone before any server loads it
        registry.set_current(r, v2, expected=1)
        refused = _until(lambda: http.get("/readyz").json().get("refused_versions"), 30, what="the refusal")
        assert "CheckpointError" in refused[str(v2)] and "manifest" in refused[str(v2)]
        resp = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3})
        assert resp.status_code == 200 and resp.headers["X-Policy-Version"] == "1"
