"""The chat page, the feedback widget and the ops page, end to end in headless Chromium against a live server.

A tiny random policy answers (gibberish, which is fine: the tests check that what the page shows is what the API
streamed and recorded, and that each click lands in Redis as the right feedback event).
Needs Debian's chromium and `pip install playwright` (see tests/utils/browser.py); skipped without them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from core.config import Settings
from service.app import create_app
from service.engine import Engine, Policy
from store import keys, registry
from store.client import connect
from store.comparisons import feedback_comparisons
from store.completions import get_completion
from store.feedback import get_feedback, latest_votes, vote_history
from tests.conftest import LiveServer
from tests.utils.browser import chromium
from tests.utils.tiny import tiny_model, tiny_tokenizer
from workers.publish import publish_version

USER_KEY, ADMIN_KEY = "sk-test-alice", "sk-test-admin"
SERVED = 2  # the engine serves v2; v1 is its parent in the registry, so the ops page can roll back to it
CHAT = "/?compare=0&max_tokens=12"  # compare=0: only the Responses control asks for 2 or 3 answers
TIMEOUT_MS = 20_000
METRICS = {1: (0.41, 0.2), 2: (0.55, 0.1)}  # version → (score/mean, over_caution)


@pytest.fixture(scope="module")
def site(redis_url, tmp_path_factory):
    r = connect(redis_url)
    r.flushdb()
    settings = Settings(
        home=Path(tmp_path_factory.mktemp("home")), api_keys=f"{USER_KEY}:alice", admin_key=ADMIN_KEY, poll_seconds=0.2
    )
    tok = tiny_tokenizer()
    models = {v: tiny_model("gpt2", seed=v) for v in (1, SERVED)}
    for v, model in models.items():  # real checkpoints, so a rollback really hot-swaps the served policy
        meta = {
            "source": "sft" if v == 1 else "ppo",
            "parent": v - 1 or None,
            "reward_version": v - 1 or None,
            "feedback": {"events": 40 * (v - 1)},
            "annotators": ["alice"],
            "metrics": {"score/mean": METRICS[v][0], "over_caution": METRICS[v][1], "kl_to_ref": v - 1.0},
        }
        publish_version(r, settings, lambda d, m=model: (m.save_pretrained(d), tok.save_pretrained(d)), meta)
    engine = Engine(Policy(version=SERVED, model=models[SERVED], tokenizer=tok, context=256))
    with LiveServer(create_app(settings, redis_url, engine)) as live, chromium() as browser:
        yield live, browser, r
    r.flushdb()
    r.close()


@pytest.fixture
def page(site):
    live, browser, _ = site
    context = browser.new_context(base_url=live.url)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _feedback_bodies(page) -> list[dict]:
    bodies: list[dict] = []
    page.on(
        "request", lambda req: bodies.append(json.loads(req.post_data)) if req.url.endswith("/v1/feedback") else None
    )
    return bodies


def _open_chat(page, key: str = USER_KEY) -> None:
    page.goto(CHAT)
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Save key").click()


def _ask(page, text: str, responses: str = "1") -> tuple[str, dict]:
    """Send `text` with Enter; return the completion id of the answer and the chat request's body."""
    page.get_by_label("Responses").select_option(responses)
    page.get_by_label("Message", exact=True).fill(text)
    with page.expect_request("**/v1/chat/completions") as req:
        page.get_by_label("Message", exact=True).press("Enter")
    answer = page.locator(".answer").last
    answer.locator(".af").wait_for()  # the widget is attached when the stream has ended
    return answer.get_attribute("data-completion-id"), json.loads(req.value.post_data)


def test_chat_streams_an_answer_with_its_version_and_thumbs_are_stored_revised_and_retried(site, page):
    _, _, r = site
    bodies = _feedback_bodies(page)
    _open_chat(page)
    cid, request = _ask(page, "Say a number.")
    assert request["stream"] is True and request["n"] == 1
    record = get_completion(r, cid)
    shown = page.locator(".answer .choice .text").last.inner_text()
    assert shown.strip() == (record.choices[0].text.strip() or "(empty response)")  # what the server streamed
    assert f"policy v{record.version}" in page.locator(".answer .meta").last.inner_text()
    assert page.locator("#policy").inner_text() == f"policy v{SERVED}"

    page.get_by_role("button", name="Thumbs up: good response").click()
    page.get_by_text("Saved (revision 1)").wait_for()
    (vote,) = latest_votes(r, cid)
    assert (vote.type, vote.choice, vote.value, vote.user, vote.version) == ("thumbs", 0, "up", "alice", SERVED)
    assert vote.id == bodies[-1]["feedback_id"]
    assert get_feedback(r, vote.id).stream_id  # the event is in the feedback log

    # Change the vote: a second event that revises the first, both kept.
    page.get_by_role("button", name="Thumbs down: bad response").click()
    page.get_by_text("Vote changed — saved (revision 2)").wait_for()
    history = vote_history(r, cid, "thumbs:0", "alice")
    assert [(v.value, v.revision) for v in history] == [("up", 1), ("down", 2)]
    assert page.get_by_role("button", name="Thumbs down: bad response").get_attribute("aria-pressed") == "true"
    assert page.get_by_role("button", name="Thumbs up: good response").get_attribute("aria-pressed") == "false"

    # A comment whose answer is lost on the way back: the server stored it, the page saw a network error.
    # The retry reuses the feedback_id, so the server answers from the first acceptance and adds nothing.
    def lose_answer(route):
        route.fetch()
        route.abort("connectionreset")

    log_length = r.xlen(keys.feedback_stream())
    page.route("**/v1/feedback", lose_answer, times=1)
    page.get_by_role("button", name="Add a comment").click()
    page.get_by_label("Comment (optional)").fill("too short")
    page.get_by_role("button", name="Save comment").click()
    page.get_by_text("Not saved: could not reach the server").wait_for()
    page.get_by_role("button", name="Retry").click()
    page.get_by_text("revision 3").wait_for()
    assert bodies[-1]["feedback_id"] == bodies[-2]["feedback_id"] and bodies[-1]["comment"] == "too short"
    assert r.xlen(keys.feedback_stream()) == log_length + 1
    assert [v.revision for v in vote_history(r, cid, "thumbs:0", "alice")] == [1, 2, 3]


def test_side_by_side_pair_is_recorded_as_a_comparison(site, page):
    _, _, r = site
    _open_chat(page)
    cid, request = _ask(page, "Say a word.", responses="2")
    assert request["n"] == 2
    texts = [t.inner_text() for t in page.locator(".answer .choice .text").all()]
    assert len(texts) == 2
    page.get_by_text("Which response do you prefer?").wait_for()
    page.get_by_role("button", name="B is better").click()
    page.get_by_text("Saved (revision 1)").wait_for()
    (comparison,) = [c for c in feedback_comparisons(r)[0] if c.group == cid]
    record = get_completion(r, cid)
    assert (comparison.meta["chosen_index"], comparison.meta["rejected_index"]) == (1, 0)
    assert [comparison.chosen, comparison.rejected] == [record.choices[1].text, record.choices[0].text]
    assert texts[1].strip() == (comparison.chosen.strip() or "(empty response)")


def test_three_responses_are_ranked_by_click_and_drag(site, page):
    _, _, r = site
    _open_chat(page)
    cid, request = _ask(page, "What is two plus three?", responses="3")
    assert request["n"] == 3
    items = page.locator(".af-rank li")
    assert items.count() == 3
    page.get_by_role("button", name="Move Response 3 up").click()  # 0 2 1
    items.nth(2).drag_to(items.nth(0))  # response 2 to the top: 1 0 2
    shown = [int(li.get_attribute("data-choice")) for li in items.all()]
    assert shown == [1, 0, 2]
    page.get_by_role("button", name="Submit ranking").click()
    page.get_by_text("Saved (revision 1)").wait_for()
    (vote,) = latest_votes(r, cid)
    assert vote.type == "rank" and vote.ranking == shown
    pairs = {(c.meta["chosen_index"], c.meta["rejected_index"]) for c in feedback_comparisons(r)[0] if c.group == cid}
    assert pairs == {(1, 0), (1, 2), (0, 2)}


def test_an_invalid_key_is_explained_and_can_be_replaced(site, page):
    _open_chat(page, key="sk-expired")
    page.get_by_label("Message", exact=True).fill("Hello, how are you?")
    page.get_by_label("Message", exact=True).press("Enter")
    error = page.locator("#key-error")
    error.wait_for()
    assert "invalid API key" in error.inner_text()  # the API's error.message, shown as it is
    assert page.locator("#key-dialog").evaluate("d => d.open")
    page.get_by_label("API key", exact=True).fill(USER_KEY)
    page.get_by_role("button", name="Save key").click()
    assert page.get_by_label("Message", exact=True).input_value() == "Hello, how are you?"  # nothing typed is lost
    page.get_by_role("button", name="Send").click()
    page.locator(".answer .af").wait_for()
    assert page.evaluate("localStorage.getItem('alignd.apiKey')") == USER_KEY


def test_ops_page_shows_errors_per_section_when_an_endpoint_is_missing(site, page):
    page.route(
        "**/admin/versions",
        lambda route: route.fulfill(
            status=404,
            content_type="application/json",
            body=json.dumps(
                {"error": {"message": "Not Found", "type": "not_found_error", "code": None, "param": None}}
            ),
        ),
    )
    page.goto("/admin")
    page.get_by_label("Admin key", exact=True).fill(USER_KEY)  # a user key is refused with the API's message
    page.get_by_role("button", name="Open").click()
    page.get_by_text("this endpoint needs the admin key").wait_for()
    page.get_by_label("Admin key", exact=True).fill(ADMIN_KEY)
    page.get_by_role("button", name="Open").click()
    page.locator("#versions-error").get_by_text("404").wait_for()
    page.locator("#stat-cards .stat").first.wait_for()  # the stats section still works
    assert page.locator("#charts").inner_text().startswith("Versions are unavailable")


def test_ops_page_lists_versions_charts_metrics_and_rolls_back(site, page):
    pytest.importorskip("service.routes.versions", reason="GET /admin/versions and POST /admin/rollback not built")
    live, _, r = site
    page.goto("/admin")
    page.get_by_label("Admin key", exact=True).fill(ADMIN_KEY)
    page.get_by_role("button", name="Open").click()
    rows = page.locator("#versions tbody tr")
    rows.first.wait_for()
    assert [row.get_attribute("data-version") for row in rows.all()] == ["2", "1"]
    assert "current" in rows.nth(0).inner_text() and "score/mean: 0.550" in rows.nth(0).inner_text()
    assert page.locator("#current").inner_text() == f"serving v{SERVED}"
    charts = {
        fig.locator("figcaption").inner_text(): fig.locator("svg").get_attribute("aria-label")
        for fig in page.locator("#charts figure").all()
    }
    for i, name in enumerate(("score/mean", "over_caution")):
        assert charts[name] == f"{name} by version: v1 {METRICS[1][i]:.3f}, v2 {METRICS[2][i]:.3f}"
    assert page.locator("#stat-cards [data-stat=events] .v").inner_text().isdigit()
    assert "published" in page.locator("#events").inner_text()

    page.get_by_role("button", name="Roll back to v1").click()  # the first click arms the button
    with page.expect_request("**/admin/rollback") as req:
        page.get_by_role("button", name="Confirm rollback to v1").click()
    assert json.loads(req.value.post_data) == {"version": 1}
    page.get_by_text("v1 is now current").wait_for()
    assert registry.current_version(r) == 1
    page.locator("#versions tr[data-version='1'] .badge.current").wait_for()
    # The server's follower verifies and loads v1, then the engine serves it: the header says so after a refresh.
    with live.client(ADMIN_KEY) as client:
        for _ in range(100):
            if client.get("/admin/versions").json()["serving"]["current"] == 1:
                break
            time.sleep(0.1)
    page.get_by_role("button", name="Refresh").click()
    page.get_by_text("serving v1", exact=True).wait_for()
