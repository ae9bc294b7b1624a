"""POST /v1/feedback and GET /admin/stats over real HTTP (uvicorn) against a real redis-server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from core.config import Settings
from service.app import create_app
from store import feedback as fb
from store import keys
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from tests.conftest import LiveServer, free_port

MAX_COMMENT = 50


def start(tmp_path_factory, redis_url, **limits) -> LiveServer:
    settings = Settings(
        home=tmp_path_factory.mktemp("home"),
        api_keys="ka:alice,kb:bob",
        admin_key="kadmin",
        max_comment_chars=MAX_COMMENT,
        **limits,
    )
    return LiveServer(create_app(settings, redis_url, engine=None)).__enter__()


@pytest.fixture(scope="module")
def server(tmp_path_factory, redis_url):
    live = start(tmp_path_factory, redis_url)
    yield live
    live.__exit__()


@pytest.fixture
def alice(server):
    with server.client("ka") as c:
        yield c


def add_completion(r, cid: str, n: int = 2, user: str = "alice", versions: list[int] | None = None) -> None:
    versions = versions or [1] * n
    save_completion(
        r,
        CompletionRecord(
            id=cid,
            user=user,
            version=max(versions),
            messages=[{"role": "user", "content": "hi"}],
            choices=[
                ChoiceRecord(index=i, text=f"answer {i}", finish_reason="stop", version=versions[i]) for i in range(n)
            ],
        ),
    )


def snapshot(r) -> dict[str, bytes]:
    kw = r.connection_pool.connection_kwargs
    dump = r.__class__(
        host=kw["host"], port=kw["port"], db=kw.get("db", 0), username=kw.get("username"), password=kw.get("password")
    )
    try:
        return {k: dump.dump(k) for k in dump.keys("*")}
    finally:
        dump.close()


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    "body",
    [
        {"type": "thumbs", "choice": 1, "value": "up", "comment": "good"},
        {"type": "pairwise", "winner": "tie"},
        {"type": "rank", "ranking": [1, 0]},
    ],
)
def test_each_type_is_accepted_with_201(r, alice, body):
    add_completion(r, "c1")
    response = alice.post("/v1/feedback", json={"completion_id": "c1", **body})
    assert response.status_code == 201, response.text
    out = response.json()
    assert out["object"] == "feedback" and out["completion_id"] == "c1" and out["type"] == body["type"]
    assert out["revision"] == 1 and abs(out["created"] - time.time()) < 60 and out["id"].startswith("fb-")
    assert r.xlen(keys.feedback_stream()) == 1 and fb.get_feedback(r, out["id"]).type == body["type"]


def test_retry_with_same_feedback_id_answers_200_and_a_new_body_409(r, alice):
    add_completion(r, "c1")
    body = {"completion_id": "c1", "type": "pairwise", "winner": 0, "feedback_id": "client-42"}
    first = alice.post("/v1/feedback", json=body)
    assert first.status_code == 201 and first.json()["id"] == "client-42"
    again = alice.post("/v1/feedback", json=body)
    assert again.status_code == 200 and again.json() == first.json()
    before = snapshot(r)
    error = assert_openai_error(alice.post("/v1/feedback", json=body | {"winner": 1}), 409)
    assert error["param"] == "feedback_id" and snapshot(r) == before
    assert r.xlen(keys.feedback_stream()) == 1


def test_revision_is_numbered_and_admin_may_vote_on_any_completion(r, server, alice):
    add_completion(r, "c1")
    revisions = [
        alice.post("/v1/feedback", json={"completion_id": "c1", "type": "thumbs", "choice": 0, "value": v}).json()[
            "revision"
        ]
        for v in ("up", "down", "up")
    ]
    assert revisions == [1, 2, 3]
    with server.client("kadmin") as admin:
        response = admin.post(
            "/v1/feedback", json={"completion_id": "c1", "type": "thumbs", "choice": 0, "value": "down"}
        )
    assert response.status_code == 201 and response.json()["revision"] == 1  # the admin's own first vote


GOOD = {"completion_id": "c2", "type": "thumbs", "choice": 0, "value": "up"}


@pytest.mark.parametrize(
    "key, body, status, param",
    [
        ("ka", GOOD | {"completion_id": "missing"}, 404, "completion_id"),
        ("kb", GOOD, 403, "completion_id"),
        ("ka", GOOD | {"choice": 2}, 422, "choice"),
        ("ka", GOOD | {"choice": -1}, 422, None),
        ("ka", GOOD | {"choice": 10**40}, 422, "choice"),
        ("ka", GOOD | {"choice": "0"}, 422, None),
        ("ka", GOOD | {"value": "sideways"}, 422, None),
        ("ka", GOOD | {"type": "stars"}, 422, None),
        ("ka", {"completion_id": "c2", "value": "up"}, 422, None),
        ("ka", GOOD | {"comment": "x" * (MAX_COMMENT + 1)}, 422, "comment"),
        ("ka", GOOD | {"feedback_id": "no spaces allowed"}, 422, None),
        ("ka", GOOD | {"feedback_id": ""}, 422, None),
        ("ka", GOOD | {"extra": True}, 422, None),
        ("ka", {"completion_id": "c3", "type": "pairwise", "winner": 0}, 422, "type"),
        ("ka", {"completion_id": "c1", "type": "pairwise", "winner": 0}, 422, "type"),
        ("ka", {"completion_id": "c2", "type": "pairwise", "winner": 2}, 422, None),
        ("ka", {"completion_id": "c3", "type": "rank", "ranking": [0, 1, 1]}, 422, "ranking"),
        ("ka", {"completion_id": "c3", "type": "rank", "ranking": [2, 1]}, 422, "ranking"),
        ("ka", {"completion_id": "c1", "type": "rank", "ranking": [0]}, 422, None),
        ("ka", [GOOD], 400, None),
        ("ka", "not json{", 400, None),
        ("ka", '{"completion_id": "c2", "type": "thumbs", "choice": 0, "value": "up",}', 400, None),
        (
            "ka",
            '{"completion_id": "c2", "type": "thumbs", "choice": 0, "value": "up", "comment": "\\ud800"}',
            422,
            None,
        ),
        ("ka", '{"completion_id": "c2\\udfff", "type": "thumbs", "choice": 0, "value": "up"}', 422, None),
        ("ka", None, 422, None),
        ("ka", GOOD | {"user": ""}, 422, "thumbs.user"),
        ("ka", GOOD | {"user": "a/b"}, 422, "thumbs.user"),
        ("ka", GOOD | {"user": "x" * 65}, 422, "thumbs.user"),
        ("ka", GOOD | {"user": "héllo"}, 422, "thumbs.user"),
        ("ka", GOOD | {"user": 7}, 422, "thumbs.user"),
        (None, GOOD, 401, None),
        ("wrong", GOOD, 401, None),
    ],
)
def test_bad_requests_get_openai_errors_and_change_nothing(r, server, key, body, status, param):
    for n in (1, 2, 3):
        add_completion(r, f"c{n}", n=n)
    before = snapshot(r)
    with server.client(key) as client:
        if isinstance(body, str):
            response = client.post("/v1/feedback", content=body, headers={"Content-Type": "application/json"})
        elif body is None:
            response = client.post("/v1/feedback")
        else:
            response = client.post("/v1/feedback", json=body)
    error = assert_openai_error(response, status)
    if param:
        assert error["param"] == param
    assert snapshot(r) == before


def wait_for_fresh_minute(margin_s: float = 8) -> None:
    """Rate windows are fixed minutes: start a limit test with time left in the window."""
    left = 60 - time.time() % 60
    if left < margin_s:
        time.sleep(left + 0.1)


def test_per_minute_limit_and_daily_cap_answer_429_with_retry_after(r, tmp_path_factory, redis_url):
    add_completion(r, "c1", n=3)
    add_completion(r, "b1", n=2, user="bob")
    servers = [
        start(tmp_path_factory, redis_url, feedback_rate_per_minute=3),
        start(tmp_path_factory, redis_url, feedback_rate_per_minute=100, feedback_daily_cap=2),
    ]
    try:
        wait_for_fresh_minute()
        with servers[0].client("ka") as client:
            for i in range(3):
                assert (
                    client.post(
                        "/v1/feedback", json={"completion_id": "c1", "type": "thumbs", "choice": i, "value": "up"}
                    ).status_code
                    == 201
                )
            before = snapshot(r)
            response = client.post("/v1/feedback", json={"completion_id": "c1", "type": "rank", "ranking": [0, 1, 2]})
            assert assert_openai_error(response, 429)["code"] == "rate_limit_exceeded"
            assert 0 < int(response.headers["Retry-After"]) <= 61 and snapshot(r) == before
        with servers[1].client("kb") as client:  # bob has his own budget
            for winner in (0, 1):
                assert (
                    client.post(
                        "/v1/feedback", json={"completion_id": "b1", "type": "pairwise", "winner": winner}
                    ).status_code
                    == 201
                )
            response = client.post("/v1/feedback", json={"completion_id": "b1", "type": "pairwise", "winner": 0})
            assert "UTC" in assert_openai_error(response, 429)["message"]
            assert 0 < int(response.headers["Retry-After"]) <= 86_401
    finally:
        for s in servers:
            s.__exit__()
    assert r.xlen(keys.feedback_stream()) == 5


def test_user_field_makes_each_person_behind_a_key_an_annotator_with_own_votes_and_limits(
    r, tmp_path_factory, redis_url
):
    add_completion(r, "c1", n=2)
    live = start(tmp_path_factory, redis_url, feedback_rate_per_minute=2)
    try:
        wait_for_fresh_minute()
        with live.client("ka") as alice_key, live.client("kb") as bob_key, live.client("kadmin") as admin:
            for person, winner in (("p1", 0), ("p2", 1), ("p1", 1)):  # p1 revises; p2 is a second voter
                body = {"completion_id": "c1", "type": "pairwise", "winner": winner, "user": person}
                assert alice_key.post("/v1/feedback", json=body).status_code == 201
            same_person = {"completion_id": "c1", "type": "pairwise", "winner": 0, "user": "alice"}
            assert alice_key.post("/v1/feedback", json=same_person).status_code == 201  # = no user: key alone
            # p1 has used the 2 votes of its minute; p3 behind the same key has its own budget
            limited = alice_key.post("/v1/feedback", json={**same_person, "user": "p1"})
            assert assert_openai_error(limited, 429)["code"] == "rate_limit_exceeded"
            assert alice_key.post("/v1/feedback", json={**same_person, "user": "p3"}).status_code == 201
            # ownership stays per key: a person's name does not open another key's completion
            assert_openai_error(bob_key.post("/v1/feedback", json={**same_person, "user": "p1"}), 403)
            # the admin key (an annotation tool) labels on behalf of a named annotator
            assert admin.post("/v1/feedback", json={**same_person, "user": "carol"}).status_code == 201
    finally:
        live.__exit__()
    latest = {v.user: v for v in fb.latest_votes(r, "c1")}
    assert set(latest) == {"alice", "alice/p1", "alice/p2", "alice/p3", "carol"}
    assert (latest["alice/p1"].winner, latest["alice/p1"].revision, latest["alice/p1"].client_user) == (1, 2, "p1")
    assert latest["alice"].client_user == "alice" and latest["carol"].client_user == "carol"
    by_user = r.hgetall(keys.feedback_stats("votes"))
    assert by_user["user:alice/p1"] == "1" and by_user["user:alice/p2"] == "1"


def test_concurrent_retries_and_revisions_keep_one_event_per_id_and_the_last_vote(r, server):
    add_completion(r, "c1")
    ids, copies = [f"rev-{i}" for i in range(8)], 3  # each id is sent by 3 threads at once
    barrier = threading.Barrier(len(ids) * copies)

    def post(i: int):
        with server.client("ka") as client:
            barrier.wait()
            body = {"completion_id": "c1", "type": "pairwise", "winner": i % 2, "feedback_id": ids[i]}
            response = client.post("/v1/feedback", json=body)
            return i, response.status_code, response.json()

    with ThreadPoolExecutor(len(ids) * copies) as pool:
        results = list(pool.map(post, [i for i in range(len(ids)) for _ in range(copies)]))
    by_id: dict[int, list] = {}
    for i, status, body in results:
        by_id.setdefault(i, []).append((status, body))
    for answers in by_id.values():
        assert sorted(s for s, _ in answers) == [200] * (copies - 1) + [201]
        assert all(body == answers[0][1] for _, body in answers)
    revision_of = {i: answers[0][1]["revision"] for i, answers in by_id.items()}
    assert sorted(revision_of.values()) == list(range(1, len(ids) + 1))
    assert r.xlen(keys.feedback_stream()) == len(ids)
    history = fb.vote_history(r, "c1", "pairwise", "alice")
    assert [(h.id, h.revision) for h in history] == sorted(
        ((ids[i], rev) for i, rev in revision_of.items()), key=lambda x: x[1]
    )
    (latest,) = fb.latest_votes(r, "c1")
    last = max(revision_of, key=revision_of.get)
    assert (latest.id, latest.winner, latest.revision) == (ids[last], last % 2, len(ids))
    votes = r.hgetall(keys.feedback_stats("votes"))
    assert votes["total"] == "1" and r.hget(keys.feedback_stats("events"), "total") == str(len(ids))


def test_admin_stats_counts_votes_events_versions_and_arena(r, server, alice):
    add_completion(r, "arena1", versions=[3, 2])
    add_completion(r, "arena2", versions=[2, 3])
    add_completion(r, "solo", n=1, versions=[3])
    posts = [
        {"completion_id": "arena1", "type": "pairwise", "winner": 1},  # revised below
        {"completion_id": "arena1", "type": "pairwise", "winner": 0},  # v3 beats v2
        {"completion_id": "arena2", "type": "pairwise", "winner": "tie"},
        {"completion_id": "solo", "type": "thumbs", "choice": 0, "value": "up"},
        {"completion_id": "arena2", "type": "thumbs", "choice": 0, "value": "down"},
    ]
    for body in posts:
        assert alice.post("/v1/feedback", json=body).status_code == 201
    assert_openai_error(alice.get("/admin/stats"), 403)
    with server.client("kadmin") as admin:
        stats = admin.get("/admin/stats").json()
    assert stats["events"]["total"] == 5 and stats["votes"]["total"] == 4
    assert stats["votes"]["by_type"] == {"pairwise": 2, "thumbs": 2} and stats["events"]["by_type"]["pairwise"] == 3
    assert stats["votes"]["by_user"] == {"alice": 4} and stats["events"]["by_version"] == {"3": 5}
    assert stats["thumbs"] == {"2": {"up": 0, "down": 1, "up_rate": 0.0}, "3": {"up": 1, "down": 0, "up_rate": 1.0}}
    assert stats["pairs"] == {"3_vs_2": {"wins": 1, "losses": 0, "ties": 1, "both_bad": 0, "win_rate": 0.75}}
    assert stats["unconsumed"] == 5 and stats["pending"] == 0
    fb.ack(r, fb.read_new(r, "trainer-1", 3))
    with server.client("kadmin") as admin:
        assert admin.get("/admin/stats").json()["unconsumed"] == 2


def test_an_unreachable_store_answers_503_so_the_client_retries(tmp_path):
    settings = Settings(home=tmp_path, api_keys="ka:alice", admin_key="kadmin")
    with LiveServer(create_app(settings, f"redis://127.0.0.1:{free_port()}/0")) as live, live.client("ka") as c:
        response = c.post("/v1/feedback", json={"completion_id": "c1", "type": "pairwise", "winner": 0})
    assert assert_openai_error(response, 503)["code"] == "redis_unavailable" and response.headers["Retry-After"]
