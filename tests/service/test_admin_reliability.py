"""GET /admin/stats shows per-annotator reliability: people behind one front-end key, named in the OpenAI `user`
field, post feedback over real HTTP into a real redis-server; a spammer and a contrarian visibly lose weight."""

from __future__ import annotations

import random

from core.config import Settings
from service.app import create_app
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from tests.conftest import LiveServer

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
