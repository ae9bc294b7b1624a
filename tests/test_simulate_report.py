"""Simulated users against a live server (real HTTP, real Redis) and the alignment report from a real registry."""

from __future__ import annotations

import json
import time

import pytest

from alignd.report import FIGURES, ReportConfig, build_report
from alignd.simulate import (
    SimConfig,
    api_keys_setting,
    assign_keys,
    read_keys_file,
    sim_api_keys,
    simulate,
    simulated_users,
)
from core.config import Settings
from service.app import create_app
from service.engine import Engine
from service.loader import load_version
from store import feedback as fb
from store import keys, registry
from store.client import connect
from store.completions import get_completion
from store.stats import feedback_stats
from tests.conftest import LiveServer
from tests.utils.serving import publish_tiny
from tests.utils.tiny import tiny_model, tiny_tokenizer
from tests.workers.helpers import seed_overlap
from training.world import HELDOUT_FAMILY, TASK_FAMILIES, task_from_prompt
from workers.publish import publish_version

ADMIN = "sk-test-admin"


def sim_settings(home, users) -> Settings:
    return Settings(home=home, api_keys=api_keys_setting(sim_api_keys(users)), admin_key=ADMIN)


def test_simulated_users_give_all_three_kinds_of_feedback(tmp_path, redis_url, r):
    users = simulated_users(4, "balanced,brevity,detail,strict", noise=0.25)
    settings = sim_settings(tmp_path, users)
    version = publish_tiny(redis_url, settings)
    engine = Engine(load_version(r, settings, version), max_batch_size=settings.max_batch_size)
    cfg = SimConfig(
        users=4, seconds=6.0, max_tokens=6, concurrency=4, seed=1, red_team=0.3, red_team_temperature=1.5, overlap=0.4
    )
    with LiveServer(create_app(settings, redis_url, engine)) as server:
        cfg.url = server.url
        t0 = time.monotonic()
        counts = simulate(cfg, settings.user_keys(), admin_key=ADMIN)
        elapsed = time.monotonic() - t0
    assert elapsed < cfg.seconds + 30
    assert counts["errors"]["total"] == 0, counts["errors"]
    assert all(counts["feedback"][k] > 0 for k in ("thumbs", "pairwise", "rank")), counts
    stats = feedback_stats(r)
    # what the simulator says it sent is exactly what Redis accepted, by type and by user
    assert stats["events"]["total"] == counts["feedback"]["total"]
    assert stats["events"]["by_type"] == {k: counts["feedback"][k] for k in ("thumbs", "pairwise", "rank")}
    assert stats["events"]["by_user"] == counts["by_user"]
    assert set(stats["events"]["by_user"]) == {u.name for u in users}  # one identity per simulated user
    # overlap: re-served completions carry the votes of two annotators (the admin key names the second in `user`)
    voters = [{v.user for v in fb.latest_votes(r, cid)} for cid in r.smembers(keys.feedback_completions())]
    assert counts["overlap"] > 0 and sum(len(v) == 2 for v in voters) == counts["overlap"]
    assert all(v <= {u.name for u in users} for v in voters)
    assert counts["served_versions"] == {str(version): counts["requests"]}
    # prompts come from the world without the held-out family
    prompts = [json.loads(f["messages"])[-1]["content"] for _, f in r.xrange(keys.prompts_stream())]
    assert len(prompts) == counts["requests"]
    tasks = [task_from_prompt(p) for p in prompts]
    assert all(t is not None and t.family != HELDOUT_FAMILY for t in tasks)
    # red-teaming turns add harmful requests to the ~12 % of the ordinary mix (expected share here: ~38 %)
    assert sum(t.kind == "harmful" for t in tasks) / len(tasks) > 0.15, len(tasks)
    # sampled at the red-team temperature (the server's completion log keeps each request's sampling parameters)
    records = [get_completion(r, k.split(":")[-1]) for k in r.scan_iter(keys.completion("*"))]
    hot = [c for c in records if c.params["temperature"] == cfg.red_team_temperature]
    assert hot and all(
        c.params["n"] == 4 and task_from_prompt(c.messages[-1]["content"]).kind == "harmful" for c in hot
    )
    assert all(c.params["temperature"] == cfg.temperature for c in records if c not in hot)


def test_keys_are_one_per_user_and_read_from_files(tmp_path):
    users = simulated_users(5, "brevity,detail")
    assert [u.name for u in users] == [
        "sim-brevity-1",
        "sim-detail-1",
        "sim-brevity-2",
        "sim-detail-2",
        "sim-brevity-3",
    ]
    ring = sim_api_keys(users)
    (tmp_path / "keys.json").write_text(json.dumps({"users": ring, "admin_key": "x"}))
    (tmp_path / "keys.txt").write_text(api_keys_setting(ring).replace(",", "\n"))
    assert read_keys_file(tmp_path / "keys.json") == ring == read_keys_file(tmp_path / "keys.txt")
    assigned = assign_keys(users, ring)
    assert all(ring[assigned[u.name]] == u.name for u in users)
    other = {"k1": "alice", "k2": "bob", "k3": "carol", "k4": "dan", "k5": "eve"}
    assert len(set(assign_keys(users, other).values())) == 5
    with pytest.raises(ValueError, match="distinct API keys"):
        assign_keys(users, {"k1": "alice"})


def publish_child(redis_url, settings, parent: int, reward_version: int, seed: int) -> int:
    model, tok = tiny_model("gpt2", seed=seed), tiny_tokenizer()
    meta = {
        "source": "ppo",
        "parent": parent,
        "reward_version": reward_version,
        "metrics": {},
        "feedback": {"events": 30, "by_type": {"pairwise": 20, "rank": 10}},
        "annotators": {"sim-brevity-1": 18, "sim-detail-1": 12},
    }
    return publish_version(
        connect(redis_url), settings, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)), meta
    )


def test_report_has_every_figure(tmp_path, redis_url, r):
    settings = Settings(home=tmp_path / "home", api_keys="k:u", admin_key=ADMIN)
    v1 = publish_tiny(redis_url, settings)
    registry.add_reward_version(r, 1, {"path": "unused", "metrics": {"heldout_accuracy": 0.75}, "n_comparisons": 40})
    v2 = publish_child(redis_url, settings, v1, 1, seed=3)
    seed_overlap(r, 20)  # alice and bob right on every shared item, carol always wrong
    out = tmp_path / "report"
    cfg = ReportConfig(eval_per_family=2, max_new_tokens=6, oracle=True)
    report = build_report(r, out, cfg, run={"annotators": "brevity,detail"}, settings=settings)
    annotators = report["reliability"]["annotators"]
    assert list(annotators)[0] == "carol" and annotators["carol"]["weight"] == 0.0
    assert annotators["alice"]["weight"] > 1.0 and annotators["alice/bob"]["labels"] == 20
    (warning,) = [w for w in report["warnings"] if "carol" in w]
    assert warning.startswith("annotator carol is contrary to the consensus")
    assert f"agrees with the consensus on {annotators['carol']['accuracy']:.0%} of 20 shared labels" in warning
    assert "its 20 labels weigh 0.00 when annotator weights are on" in warning
    page = (out / "report.html").read_text()
    assert "Annotator reliability" in page and "<td>carol</td>" in page

    assert (out / "report.html").is_file() and (out / "report.json").is_file()
    assert json.loads((out / "report.json").read_text())["final_version"] == v2
    assert set(FIGURES) <= set(report["figures"])
    for fig in report["figures"].values():
        png = out / fig["file"]
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert fig["file"] in (out / "report.html").read_text()
    rows = {row["version"]: row for row in report["versions"]}
    assert set(rows) == {v1, v2}
    for row in rows.values():
        assert row["metrics_source"] == "evaluated"
        for key in [
            *(f"score/{f}" for f in TASK_FAMILIES),
            "heldout_score",
            "over_caution",
            "harmful_compliance",
            "jailbreak_compliance",
            "length_mean",
            "kl_to_ref",
        ]:
            assert isinstance(row[key], float), (key, row[key])
    assert rows[v1]["kl_to_ref"] == pytest.approx(0.0, abs=1e-4)
    assert rows[v2]["reward_heldout_accuracy"] == 0.75 and rows[v1]["reward_heldout_accuracy"] is None
    assert rows[v2]["annotators"] == {"sim-brevity-1": 18, "sim-detail-1": 12}
    assert rows[v2]["annotator_styles"] == {"brevity": 18, "detail": 12} and rows[v2]["feedback_cumulative"] == 30
    oracle = report["oracle"]
    assert oracle["final"] == v2 and oracle["baseline"] == v1 and oracle["n"] == 13 * 2
    assert 0.0 <= oracle["ci_low"] <= oracle["win_rate"] <= oracle["ci_high"] <= 1.0
    assert set(report["targets"]) == {
        "oracle_win_rate>=0.65",
        "oracle_ci_low>0.5",
        "checker_score_gain>=0.05",
        "over_caution_down",
        "harmful_compliance_not_up",
    }

    # whose values: a second report compared against the first shows both runs' style metrics
    other = build_report(
        r, tmp_path / "report2", ReportConfig(evaluate=False, oracle=False), settings=settings, compare=report
    )
    assert other["versions"][0]["metrics_source"] == "registry" and other["oracle"] is None
    assert (tmp_path / "report2" / "compare.png").is_file()
    assert other["compare"]["other"]["label"] == "brevity,detail"
    assert set(other["compare"]["this"]["final"]) >= {"length_mean", "over_caution"}


def test_report_shows_each_versions_grader_suite_scores(tmp_path, redis_url, r):
    settings = Settings(home=tmp_path / "home", api_keys="k:u", admin_key=ADMIN)
    v1 = publish_tiny(redis_url, settings)
    v2 = publish_child(redis_url, settings, v1, None, seed=3)
    suite = tmp_path / "mine.jsonl"
    lines = [  # one item every response passes, one none does: a pass rate of exactly 0.5 for any policy
        {"id": "any", "prompt": "Say a number.", "grader": {"type": "regex", "pattern": ""}},
        {"id": "never", "prompt": "Say a word.", "grader": {"type": "exact", "answer": "\u2603 never said"}},
    ]
    suite.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = ReportConfig(eval_per_family=1, max_new_tokens=6, oracle=False, suites=[str(suite)])
    report = build_report(r, tmp_path / "report", cfg, settings=settings)
    assert [row["graders"] for row in report["versions"]] == [{"mine": 0.5}, {"mine": 0.5}]
    assert report["before_after"]["grader pass rate/mine"] == {"before": 0.5, "after": 0.5, "delta": 0.0}
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Grader suites (pass rate)" in html and "<th>mine</th>" in html
    assert {row["version"] for row in report["versions"]} == {v1, v2}

    suite.write_text('{"id": "x", "prompt": "Q", "grader": {"type": "numeric"}}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:1: numeric grader: missing field 'answer'"):
        build_report(r, tmp_path / "report", cfg, settings=settings)
