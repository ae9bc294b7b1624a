"""Screenshots of the chat page and the ops page for the README, taken in headless Chromium.

Starts a throw-away alignd (embedded Redis in a temp folder, a tiny policy fine-tuned for a few seconds), seeds the
registry with five versions and some demo feedback so the ops page has something to show, then drives the pages.

    python scripts/screenshots.py            # writes docs/screenshots/{chat,chat-mobile,admin}.png, prints JSON

Needs Debian's chromium and `pip install playwright` (tests/utils/browser.py).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.config import Settings  # noqa: E402
from core.redis_server import EmbeddedRedis  # noqa: E402
from service.app import create_app  # noqa: E402
from service.engine import Engine, Policy  # noqa: E402
from store import registry  # noqa: E402
from store.client import connect  # noqa: E402
from store.completions import ChoiceRecord, CompletionRecord, save_completion  # noqa: E402
from store.feedback import FeedbackLimits, PairwiseFeedback, ThumbsFeedback, submit_feedback  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from tests.utils.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
USER_KEY, ADMIN_KEY = "sk-demo-user", "sk-demo-admin"
N_VERSIONS = 5
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
LIMITS = FeedbackLimits(per_minute=10_000, per_day=100_000, max_comment_chars=2000)


def seed_registry(r) -> None:
    """Five versions whose metrics move the way a healthy online loop's do (made-up numbers, for the picture)."""
    for v in range(1, N_VERSIONS + 1):
        t = v - 1
        metrics = {
            "score/mean": 0.52 + 0.06 * t - 0.004 * t * t,
            "heldout_score": 0.40 + 0.045 * t,
            "over_caution": 0.14 - 0.02 * t,
            "kl_to_ref": 0.0 if v == 1 else 0.9 + 0.55 * t,
            "length_mean": 9.0 + 0.4 * t,
            "harmful_compliance": 0.08 - 0.01 * t,
        }
        meta = {
            "source": "sft" if v == 1 else "ppo",
            "parent": v - 1 or None,
            "reward_version": None if v == 1 else t,
            "feedback": {"events": 0 if v == 1 else 150 * t},
            "path": f"v{v}",
            "annotators": ["built-in demonstrations"] if v == 1 else ["alice", "bob"],
            "metrics": metrics,
        }
        registry.add_version(r, v, meta)
        registry.set_current(r, v, detail={"parent": v - 1 or None})


def seed_feedback(r, rng: random.Random) -> None:
    """Arena votes between neighbouring versions (the newer one preferred about 60 % of the time) and thumbs."""
    for newer in range(2, N_VERSIONS + 1):
        for _ in range(24):
            versions = [newer, newer - 1]
            rng.shuffle(versions)
            record = CompletionRecord(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                user="bob",
                version=newer,
                arena=True,
                messages=[{"role": "user", "content": "Say a number."}],
                choices=[
                    ChoiceRecord(index=i, text=f"The answer is {rng.randrange(99)}.", finish_reason="stop", version=v)
                    for i, v in enumerate(versions)
                ],
            )
            save_completion(r, record)
            u = rng.random()
            winner = versions.index(newer) if u < 0.6 else versions.index(newer - 1) if u < 0.9 else "tie"
            submit_feedback(
                r, PairwiseFeedback(completion_id=record.id, type="pairwise", winner=winner), user="bob", limits=LIMITS
            )
            submit_feedback(
                r,
                ThumbsFeedback(
                    completion_id=record.id,
                    type="thumbs",
                    choice=0,
                    value="up" if rng.random() < 0.5 + 0.05 * newer else "down",
                ),
                user="bob",
                limits=LIMITS,
            )


def main() -> None:
    from playwright.sync_api import sync_playwright

    torch.set_num_threads(1)
    started = time.monotonic()
    OUT.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="alignd-shots-"))
    server = EmbeddedRedis(home / "redis")
    url = server.start()
    try:
        r = connect(url)
        seed_registry(r)
        seed_feedback(r, random.Random(0))
        policy = Policy(version=N_VERSIONS, model=tiny_sft_model("gpt2"), tokenizer=tiny_tokenizer(), context=256)
        settings = Settings(home=home, api_keys=f"{USER_KEY}:alice", admin_key=ADMIN_KEY)
        with LiveServer(create_app(settings, url, Engine(policy))) as live, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                shots = take(browser, live.url)
            finally:
                browser.close()
    finally:
        server.stop()
    print(
        json.dumps(
            {"screenshots": [str(s.relative_to(ROOT)) for s in shots], "seconds": round(time.monotonic() - started, 1)}
        )
    )


def take(browser, base_url: str) -> list[Path]:
    context = browser.new_context(base_url=base_url, viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto("/?compare=0&max_tokens=24")
    page.get_by_label("API key", exact=True).fill(USER_KEY)
    page.get_by_role("button", name="Save key").click()
    for text, n in (("What is 3 plus 4?", "1"), ("Say a number.", "2")):
        page.get_by_label("Responses").select_option(n)
        page.get_by_label("Message", exact=True).fill(text)
        page.get_by_label("Message", exact=True).press("Enter")
        page.locator(".answer").last.locator(".af").wait_for()
    page.get_by_role("button", name="Thumbs up: good response").click()
    page.get_by_role("button", name="A is better").click()
    page.get_by_text("Saved (revision 1)").last.wait_for()
    page.get_by_label("Message", exact=True).fill("What is 2 plus 5?")
    page.locator("body").evaluate("() => window.scrollTo(0, 0)")
    shots = [OUT / "chat.png", OUT / "chat-mobile.png", OUT / "admin.png"]
    page.screenshot(path=shots[0])
    page.set_viewport_size(PHONE)
    page.screenshot(path=shots[1])

    page.set_viewport_size(DESKTOP)
    page.goto("/admin")
    page.get_by_label("Admin key", exact=True).fill(ADMIN_KEY)
    page.get_by_role("button", name="Open").click()
    page.locator("#stat-cards .stat").first.wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=shots[2], full_page=True)
    context.close()
    return shots


if __name__ == "__main__":
    main()
