"""workers/cycle.py without Celery: a cycle publishes a traceable version, the gate refuses, the feedback is used
exactly once even when a cycle dies at the worst moment, and PPO state resumes across cycles."""

from __future__ import annotations

import json

import pytest

from store import feedback as fb
from store import keys, registry
from store.lock import FencedLock
from tests.workers.helpers import TINY_CYCLE, make_settings, publish_tiny, seed_feedback, tiny_overrides
from training.checkpoint import verify_checkpoint
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig, GateConfig
from workers.gate import gate, harmful_rate, is_degenerate, without_outcomes


@pytest.fixture
def home(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    return settings


def tiny(**dotted) -> CycleConfig:
    return CycleConfig.from_dict(tiny_overrides(**dotted))


def test_cycle_publishes_with_provenance_acks_and_resumes(r, home):
    events = seed_feedback(r, 24)
    assert run_cycle(r, home, tiny(), min_events=25)["status"] == "skipped"
    assert fb.unconsumed_count(r) == 24  # a skipped cycle takes nothing

    report = run_cycle(r, home, tiny(), min_events=24)
    assert report["status"] == "published" and registry.current_version(r) == 2
    meta = registry.get_version(r, 2)
    assert meta["parent"] == 1 and meta["source"] == "ppo" and meta["reference_version"] == 1
    assert meta["feedback"]["events"] == 24 and meta["feedback"]["new_comparisons"] == 24
    assert meta["feedback"]["first_id"] == events[0].stream_id and meta["feedback"]["last_id"] == events[-1].stream_id
    assert meta["annotators"] == {"alice": 12, "bob": 12}
    # no item was labelled twice: reliability is not identified and everyone keeps weight 1 (off by default)
    assert meta["reliability"]["applied"] is False and set(meta["reliability"]["annotators"]) == {"alice", "bob"}
    assert all(not a["identified"] and a["weight"] == 1.0 for a in meta["reliability"]["annotators"].values())
    for key in ("score/mean", "heldout_score", "over_caution", "kl_to_ref", "reward_mean", "degenerate_share"):
        assert key in meta["metrics"], key
    assert meta["metrics"]["gate"]["parent_reward_mean"] is not None
    manifest = verify_checkpoint(home.checkpoint(meta["path"]))
    assert manifest["parent"] == 1 and manifest["feedback"]["events"] == 24
    rm = registry.get_reward_version(r, meta["reward_version"])
    assert registry.current_reward_version(r) == 1
    assert verify_checkpoint(home.checkpoint(rm["path"]))["kind"] == "reward_model"
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0
    assert json.loads(r.get(keys.ppo_state())) == {"version": 2, "path": "ppo/state-v2"}  # relative to the home

    moved = home.home.parent / "moved"  # a home restored elsewhere (a new volume mount): PPO still resumes there
    home.home.rename(moved)
    home = home.model_copy(update={"home": moved})
    seed_feedback(r, 6, seed=1)
    # a new reward model must beat the old by over +100 % accuracy (0 → 1 is +100 %): refused
    second = run_cycle(r, home, tiny(**{"gate.reward_tolerance": -1.01}))
    assert second["status"] == "published" and second["version"] == 3
    assert second["update"]["resumed"] and second["update"]["total_steps"] == 2 * TINY_CYCLE["update"]["steps"]
    assert not second["reward"]["accepted"] and "regresses" in second["reward"]["reason"]
    # each cycle gates on a fresh evaluation set: the parent is never re-scored on the set it was selected on
    assert second["gate"]["eval_seed"] != meta["metrics"]["gate"]["eval_seed"]
    assert registry.current_reward_version(r) == 1 and registry.get_version(r, 3)["reward_version"] == 1
    assert registry.get_version(r, 3)["feedback"]["events"] == 6


def test_failed_gate_is_recorded_and_the_current_version_stays(r, home):
    seed_feedback(r, 12)
    report = run_cycle(r, home, tiny(**{"gate.min_reward_gain": 1e9}))
    assert report["status"] == "gate_failed" and "did not improve" in report["reasons"][0]
    assert registry.current_version(r) == 1 and [m["version"] for m in registry.list_versions(r)] == [1]
    failed = registry.find_events(r, event="gate_failed")
    assert failed and failed[0]["cycle"] == report["cycle"] and failed[0]["feedback"]["events"] == 12
    assert fb.unconsumed_count(r) == 0  # accounted for by the recorded failure


def test_events_of_a_run_that_died_after_publishing_are_not_used_again(r, home):
    seed_feedback(r, 8)
    dead = FencedLock(r, "train", ttl_ms=60_000, heartbeat_s=3600)
    dead.acquire()
    taken = fb.read_new(r, f"cycle-{dead.token}", 100)
    r.hset(keys.train_inflight(), str(dead.token), json.dumps({"ids": [e.stream_id for e in taken]}))
    publish_tiny(r, home, source="ppo", parent=1, cycle=dead.token, expected=1, fencing_token=dead.token)
    r.delete(keys.lock("train"))  # the worker died right after publishing, before acknowledging
    assert fb.pending_count(r) == 8

    seed_feedback(r, 3, seed=5)
    report = run_cycle(r, home, tiny())
    assert report["recovered"] == {"acked": 8, "released": 0}
    assert report["status"] == "published" and report["feedback"]["events"] == 3  # only the new ones
    assert fb.unconsumed_count(r) == 0 and r.hlen(keys.train_inflight()) == 0


def test_events_of_a_run_that_died_before_publishing_are_reclaimed(r, home):
    seed_feedback(r, 8)
    dead = FencedLock(r, "train", ttl_ms=60_000, heartbeat_s=3600)
    dead.acquire()
    taken = fb.read_new(r, f"cycle-{dead.token}", 100)
    r.hset(keys.train_inflight(), str(dead.token), json.dumps({"ids": [e.stream_id for e in taken]}))
    r.delete(keys.lock("train"))
    report = run_cycle(r, home, tiny())
    assert report["recovered"] == {"acked": 0, "released": 8}
    assert report["status"] == "published" and report["feedback"]["events"] == 8
    assert fb.unconsumed_count(r) == 0


def _metrics(**kw) -> dict:
    """Gate inputs with these rates, and per-prompt outcomes that give them on 400 prompts per check, the bad ones
    first: two such policies differ on |difference| x 400 prompts, all one way — an unmistakable change."""
    m = {
        "reward_mean": 0.0,
        "kl_to_ref": 1.0,
        "degenerate_share": 0.0,
        "length_mean": 10.0,
        "harmful_compliance": 0.0,
        "jailbreak_compliance": 0.05,
        "over_caution": 0.1,
        "score/mean": 0.6,
    } | kw
    bad = lambda rate: [1] * round(rate * 400) + [0] * (400 - round(rate * 400))  # noqa: E731
    score = [1 - x for x in bad(1 - m["score/mean"])]
    return m | {
        "outcomes": {
            "harmful": bad(harmful_rate(m)),
            "over_caution": bad(m["over_caution"]),
            "score": score,
            "prompts": "p",
        }
    }


@pytest.mark.parametrize("halfway_passes", [True, False])
def test_a_failed_candidate_falls_back_to_the_policy_from_halfway(r, home, monkeypatch, halfway_passes):
    import workers.gate_stage as gate_stage

    calls = []

    def strict_on_the_full_run(candidate, current, cfg, reference=None):  # the real gate, plus one forced verdict
        passed, reasons, numbers = gate(candidate, current, cfg, reference)
        calls.append(candidate)
        if len(calls) == 1 or not halfway_passes:
            return False, reasons + ["forced: overshot"], numbers
        return passed, reasons, numbers

    monkeypatch.setattr(gate_stage, "gate", strict_on_the_full_run)
    seed_feedback(r, 12)
    report = run_cycle(r, home, tiny(**{"update.steps": 4}))
    assert len(calls) == 2 and calls[0] != calls[1]  # two different policies were evaluated
    if halfway_passes:
        assert report["status"] == "published" and registry.current_version(r) == 2
        assert report["gate"]["fallback"]["steps"] == 2 and report["gate"]["fallback"]["of"] == 4
        assert "forced: overshot" in report["gate"]["fallback"]["full_run_reasons"]
        assert report["update"]["published_steps"] == 2 and report["metrics"] == without_outcomes(calls[1])
        assert registry.get_version(r, 2)["metrics"]["gate"]["fallback"]["steps"] == 2
        assert r.get(keys.ppo_state()) is None  # no trainer state matches the published weights: next cycle is fresh
        seed_feedback(r, 4, seed=3)
        monkeypatch.setattr(gate_stage, "gate", gate)
        assert not run_cycle(r, home, tiny())["update"]["resumed"]
    else:
        assert report["status"] == "gate_failed" and registry.current_version(r) == 1
        assert any(reason.startswith("(halfway, after 2 steps") for reason in report["reasons"])


@pytest.mark.parametrize(
    "candidate, reason",
    [
        (_metrics(reward_mean=-0.1), "did not improve"),
        (_metrics(reward_mean=0.5, kl_to_ref=50.0), "KL"),
        (_metrics(reward_mean=0.5, degenerate_share=0.5), "empty or repetitive"),
        (_metrics(reward_mean=0.5, length_mean=30.0), "length"),
        # the reward model is fooled (it says better) but the world's checkers see the regression
        (_metrics(reward_mean=0.5, jailbreak_compliance=0.2), "harmful compliance rose"),
        (_metrics(reward_mean=0.5, harmful_compliance=0.25), "harmful compliance rose"),
        (_metrics(reward_mean=0.5, over_caution=0.2), "over-caution rose"),
        (_metrics(reward_mean=0.5, **{"score/mean": 0.5}), "checker score fell"),
    ],
)
def test_gate_names_each_failure(candidate, reason):
    passed, reasons, _ = gate(candidate, _metrics(), GateConfig())
    assert not passed and len(reasons) == 1 and reason in reasons[0]
    assert gate(_metrics(reward_mean=0.5), _metrics(), GateConfig())[0]
    # within the tolerances (sampling noise of one or two prompts) it passes
    assert gate(
        _metrics(reward_mean=0.5, jailbreak_compliance=0.07, over_caution=0.12, **{"score/mean": 0.57}),
        _metrics(),
        GateConfig(),
    )[0]


def test_gate_bounds_harmful_drift_against_the_reference():
    # each cycle within the per-cycle tolerance of its parent, but together well above the SFT reference
    parent = _metrics(jailbreak_compliance=0.07)
    candidate = _metrics(reward_mean=0.5, jailbreak_compliance=0.09)
    assert gate(candidate, parent, GateConfig())[0]  # without the reference: passes
    passed, reasons, numbers = gate(candidate, parent, GateConfig(), reference=_metrics(jailbreak_compliance=0.03))
    assert not passed and len(reasons) == 1 and "SFT reference" in reasons[0]
    assert numbers["reference_harmful_rate"] < numbers["parent_harmful_rate"] < numbers["harmful_rate"]
    assert gate(candidate, parent, GateConfig(), reference=_metrics(jailbreak_compliance=0.07))[0]


def test_degenerate_responses():
    assert is_degenerate("") and is_degenerate("   ") and is_degenerate("the the the the the the the")
    assert is_degenerate("!!!!!!!!!!!!!!!!")
    assert not is_degenerate("The answer is 5.") and not is_degenerate("Paris is the capital of France.")


def test_a_run_whose_lock_was_taken_over_publishes_nothing_and_leaves_its_events(r, home):
    seed_feedback(r, 6)
    thief = FencedLock(r, "train", ttl_ms=60_000)

    def take_over(stage: str, info: dict) -> None:
        if stage == "gate":  # the run's lock expired (a long pause) and another run took it before the publish
            r.delete(keys.lock("train"))
            thief.acquire()

    report = run_cycle(r, home, tiny(), progress=take_over)
    assert report["status"] == "conflict" and "lock was lost" in report["reason"]
    assert registry.current_version(r) == 1 and [m["version"] for m in registry.list_versions(r)] == [1]
    assert fb.unconsumed_count(r) == 6  # not acknowledged: the next cycle trains on them
    thief.release()
    again = run_cycle(r, home, tiny())
    assert again["status"] == "published" and again["feedback"]["events"] == 6 and fb.unconsumed_count(r) == 0


def test_a_cycle_with_nothing_new_to_learn_from_records_that_and_publishes_nothing(r, home):
    roomy = tiny(lock_ttl_s=30.0)  # a loaded machine must not expire the lock: this test is about what is learnt
    seed_feedback(r, 8)
    assert run_cycle(r, home, roomy)["status"] == "published" and registry.current_version(r) == 2
    reward_versions = registry.current_reward_version(r)

    report = run_cycle(r, home, roomy)  # no new feedback: the replay and the reward model alone teach nothing new
    assert report["status"] == "nothing_new" and report["reason"] == "no new feedback" and report["current"] == 2
    assert registry.current_version(r) == 2 and len(registry.list_versions(r)) == 2
    assert registry.current_reward_version(r) == reward_versions  # the reward model was not retrained either
    assert registry.cycle_event(r, report["cycle"], "nothing_new")["reason"] == "no new feedback"

    gone = seed_feedback(r, 3, seed=5)  # events whose completions expired: they give no comparison
    for event in gone:
        r.delete(keys.completion(event.completion_id))
    report = run_cycle(r, home, roomy)
    assert report["status"] == "nothing_new" and report["reason"].startswith("none of the 3 new feedback events")
    assert report["settled"]["used"] and report["settled"]["acked"] == 3  # accounted for: not read again
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0 and len(registry.list_versions(r)) == 2
