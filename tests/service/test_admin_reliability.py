"""GET /admin/stats shows per-annotator reliability: people behind one front-end key, named in the OpenAI `user`
field, post feedback over real HTTP into a real redis-server; a spammer and a contrarian visibly lose weight. Its
figures equal a full recount of the votes, and the reliability estimate reads a bounded window of recent votes."""

from __future__ import annotations

import random
from collections import Counter

from core.config import Settings
from service.app import create_app
from service.routes import admin as admin_routes
from store import feedback as fb
from store import keys
from store.comparisons import feedback_comparisons
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from tests.conftest import LiveServer
from tests.store.test_exchange import BODY, LIMITS, seed
from tests.workers.helpers import seed_feedback
from training.reliability import from_dicts, table_dict

HONEST = {"p1": 0.9, "p2": 0.85, "p3": 0.85, "p4": 0.8}
BAD = {"spammer": 0.5, "contrarian": 0.15}
ITEMS, PER_ITEM = 150, 3


def completion(r, cid: str) -> None:
    save_completion(
        r,
        CompletionRecord(
            id=cid,
            user="frontend",  # the key's user id: the front end owns the completions it asked for
            version=1,
            messages=[{"role": "user", "content": f"question {cid}"}],
            choices=[
                ChoiceRecord(index=i, text=f"answer {i} to {cid}", finish_reason="stop", version=1) for i in (0, 1)
            ],
        ),
    )


def test_a_spammer_and_a_contrarian_lose_weight_in_admin_stats(r, tmp_path, redis_url):
    settings = Settings(home=tmp_path, api_keys="kfront:frontend,kother:other", admin_key="kadmin")
    rng, people = random.Random(7), HONEST | BAD
    with (
        LiveServer(create_app(settings, redis_url, engine=None)) as live,
        live.client("kfront") as front,
        live.client("kadmin") as admin,
    ):
        for k in range(ITEMS):
            cid = f"chatcmpl-rel{k}"
            completion(r, cid)
            better = rng.randrange(2)  # the hidden true answer
            for person in rng.sample(sorted(people), PER_ITEM):
                winner = better if rng.random() < people[person] else 1 - better
                body = {"completion_id": cid, "type": "pairwise", "winner": winner, "user": person}
                assert front.post("/v1/feedback", json=body).status_code == 201
        first = admin.get("/admin/stats")
        assert first.status_code == 200, first.text
        table = first.json()["reliability"]["annotators"]

        assert set(table) == {f"frontend/{p}" for p in people}  # one annotator per (key, user)
        assert sum(a["labels"] for a in table.values()) == ITEMS * PER_ITEM
        assert all(a["identified"] and a["overlap"] == a["labels"] for a in table.values())
        lowest = list(table)[:2]  # lowest weight first
        assert set(lowest) == {"frontend/spammer", "frontend/contrarian"}
        assert table["frontend/contrarian"]["accuracy"] < 0.4 and table["frontend/contrarian"]["weight"] == 0.0
        assert abs(table["frontend/spammer"]["accuracy"] - 0.5) < 0.12 and table["frontend/spammer"]["weight"] < 0.4
        for p, accuracy in HONEST.items():
            row = table[f"frontend/{p}"]
            assert abs(row["accuracy"] - accuracy) < 0.12 and row["weight"] > 0.8, (p, row)

        # a new vote is seen at once (the estimate is cached only while no vote arrives)
        completion(r, "chatcmpl-late")
        late = {"completion_id": "chatcmpl-late", "type": "pairwise", "winner": 0, "user": "newcomer"}
        assert front.post("/v1/feedback", json=late).status_code == 201
        again = admin.get("/admin/stats").json()["reliability"]["annotators"]
        assert again["frontend/newcomer"] == {
            "accuracy": 0.75,
            "labels": 1,
            "overlap": 0,
            "weight": 1.0,
            "identified": False,
        }
        # the admin key only: a front end may not read its people's reliability
        with live.client("kother") as other:
            assert other.get("/admin/stats").status_code == 403


def test_admin_stats_equals_a_full_recount_and_reads_a_bounded_window(r, tmp_path, redis_url, monkeypatch):
    settings = Settings(home=tmp_path, api_keys="kfront:frontend", admin_key="kadmin")
    seed(r)  # every kind of vote, with a revision below
    seed_feedback(r, 30)
    fb.submit_feedback(
        r, BODY.validate_python({"completion_id": "p", "type": "pairwise", "winner": 0}), user="alice", limits=LIMITS
    )
    with LiveServer(create_app(settings, redis_url, engine=None)) as live, live.client("kadmin") as admin:
        stats = admin.get("/admin/stats").json()
        # the counters kept at acceptance against a recount of the latest votes
        votes = [v for cid in sorted(r.smembers(keys.feedback_completions())) for v in fb.latest_votes(r, cid)]
        assert stats["votes"]["total"] == len(votes) == 37
        assert stats["votes"]["by_type"] == dict(Counter(v.type for v in votes))
        assert stats["votes"]["by_user"] == dict(Counter(v.user for v in votes))
        assert stats["votes"]["by_version"] == dict(Counter(str(v.version) for v in votes))
        assert stats["events"]["total"] == 38  # the revision is an event, not a vote
        up = Counter(str(v.choice_versions[v.choice]) for v in votes if v.type == "thumbs" and v.value == "up")
        assert {k: t["up"] for k, t in stats["thumbs"].items()} == {k: up.get(k, 0) for k in stats["thumbs"]}
        # reliability over the window equals the estimate over every vote while everything fits
        assert stats["reliability"]["annotators"] == table_dict(from_dicts(*feedback_comparisons(r)))

        monkeypatch.setattr(admin_routes, "RELIABILITY_WINDOW", 10)
        seed_feedback(r, 1, seed=5)  # a new vote: the estimate is made again, over the 10 most recent items only
        bounded = admin.get("/admin/stats").json()
        assert sum(a["labels"] for a in bounded["reliability"]["annotators"].values()) <= 10
        assert bounded["votes"]["total"] == 38  # the counters still count every vote
