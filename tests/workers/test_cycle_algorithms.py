"""The cycle with DPO or KTO as its policy update (CycleConfig.update.algorithm): it trains on the cycle's new
comparisons plus a replay of older ones, against the SFT reference, passes the same gate, publishes a version that
records its algorithm, and settles its feedback exactly as a PPO cycle does."""

from __future__ import annotations

import threading

import pytest

from store import feedback as fb
from store import registry
from tests.workers.helpers import (
    BODY,
    LIMITS,
    add_completion,
    make_settings,
    publish_tiny,
    seed_feedback,
    seed_overlap,
    tiny_overrides,
)
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig


def algorithm_cycle(algorithm: str, **dotted) -> CycleConfig:
    budget = {f"{algorithm}.max_seconds": 5.0, f"{algorithm}.max_steps": 4, f"{algorithm}.lr": 1e-3}
    return CycleConfig.from_dict(tiny_overrides(**{"update.algorithm": algorithm, **budget, **dotted}))


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_a_preference_cycle_publishes_and_uses_its_feedback_once(r, redis_url, tmp_path, algorithm):
    settings = make_settings(tmp_path / "home", redis_url)
    v1 = publish_tiny(r, settings)
    seed_feedback(r, 16)
    report = run_cycle(r, settings, algorithm_cycle(algorithm))
    assert report["status"] == "published", report
    meta = registry.get_version(r, report["version"])
    assert meta["source"] == algorithm and meta["reference_version"] == v1 and meta["parent"] == v1
    info = meta["update"]
    assert info["algorithm"] == algorithm and info["steps"] >= 1
    assert {k: info["data"][k] for k in ("new", "replay")} == {"new": 16, "replay": 0}
    assert ("onpolicy" in info["data"]) is (algorithm == "dpo")  # DPO's judged pairs are on by default
    assert meta["feedback"]["events"] == 16
    assert fb.unconsumed_count(r) == 0 and fb.pending_count(r) == 0  # settled: used by this version

    seed_feedback(r, 8, seed=1)  # the next cycle learns from its 8 new votes plus a replay of the 16 older ones
    second = run_cycle(r, settings, algorithm_cycle(algorithm))
    assert second["status"] == "published", second
    data = registry.get_version(r, second["version"])["update"]["data"]
    assert (data["new"], data["replay"]) == (8, 16)


@pytest.mark.parametrize("weights", [True, False])
def test_a_contrarian_gets_zero_weight_recorded_in_the_version(r, redis_url, tmp_path, weights):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_overlap(r, 30)  # alice/bob agree on every item, carol always says the opposite
    report = run_cycle(r, settings, algorithm_cycle("dpo", **{"reward.annotator_weights": weights}))
    assert report["status"] == "published", report
    meta = registry.get_version(r, report["version"])
    table = meta["reliability"]
    assert table["applied"] is weights and list(table["annotators"])[0] == "carol"  # lowest weight first
    carol, alice, bob = (table["annotators"][a] for a in ("carol", "alice", "alice/bob"))
    assert carol["accuracy"] < 0.2 and carol["weight"] == 0.0 and carol["labels"] == carol["overlap"] == 30
    assert alice["accuracy"] > 0.8 and alice["weight"] > 1.0 and bob["weight"] > 1.0
    assert meta["annotators"] == {"alice": 30, "alice/bob": 30, "carol": 30}


def test_dpo_on_thumbs_alone_trains_with_kto_and_says_so(r, redis_url, tmp_path):
    """A thumb on one answer makes no DPO pair; a deployment whose users only click thumbs must still learn."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    for i in range(16):
        rec = add_completion(r, i % 10, (3 * i) % 10, "alice")
        right = rec.choices[0].text.endswith(f"{i % 10 + (3 * i) % 10}.")
        vote = {"completion_id": rec.id, "type": "thumbs", "choice": 0, "value": "up" if right else "down"}
        fb.submit_feedback(r, BODY.validate_python(vote), user="alice", limits=LIMITS)
    report = run_cycle(r, settings, algorithm_cycle("dpo", **{"kto.max_seconds": 5.0, "kto.max_steps": 4}))
    assert report["status"] == "published", report
    meta = registry.get_version(r, report["version"])
    assert meta["source"] == "kto" and meta["update"]["algorithm"] == "kto" and meta["update"]["requested"] == "dpo"
    assert meta["update"]["data"]["new"] == 16 and fb.unconsumed_count(r) == 0


def test_a_dpo_cycle_with_onpolicy_pairs_trains_on_them_and_records_them(r, redis_url, tmp_path):
    """update.onpolicy_pairs: the current policy answers the users' recent prompts twice, the reward model the cycle
    just trained judges the answers, and the pairs it separates are trained on beside the people's and recorded in
    the version's provenance with their weight; at weight 0 none are sampled and none are recorded."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_feedback(r, 16)  # 16 completions: their prompts are the recent user prompts
    on = {"update.onpolicy_pairs": 6, "update.onpolicy_weight": 0.5, "update.onpolicy_min_margin": 0.0}
    report = run_cycle(r, settings, algorithm_cycle("dpo", **on))
    assert report["status"] == "published", report
    meta = registry.get_version(r, report["version"])
    onpolicy = meta["update"]["data"]["onpolicy"]
    assert onpolicy["prompts"] == 6 and onpolicy["answers"] == 12 and onpolicy["weight"] == 0.5
    assert 1 <= onpolicy["pairs"] <= 6, onpolicy  # distinct answers always differ a little to a reward model
    assert meta["data"]["judged_pairs"] == onpolicy["pairs"] and meta["data"]["judged_weight"] == 0.5
    assert meta["data"]["judged_by_reward_version"] == onpolicy["judge_reward_version"] == 1
    trained = meta["update"]["metrics"]
    assert trained["n_train"] + trained["n_heldout"] == 16 + onpolicy["pairs"]  # beside the people's 16

    seed_feedback(r, 8, seed=1)
    second = run_cycle(r, settings, algorithm_cycle("dpo", **(on | {"update.onpolicy_weight": 0.0})))
    assert second["status"] == "published", second
    meta = registry.get_version(r, second["version"])
    assert meta["update"]["data"] == {"new": 8, "replay": 16} and "judged_pairs" not in meta["data"]


def test_a_dpo_cycle_retrains_the_reward_model_beside_the_update(r, redis_url, tmp_path):
    """update.reward_beside: once a reward model is current, a DPO cycle retrains it on a second thread while the
    policy trains, and the on-policy pairs are judged by the reward model current when the cycle began; off, the
    stages run one after the other on the cycle's thread and the reward model just trained judges. The first
    cycle, with no reward model to judge with, always trains it first."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    on = {"update.onpolicy_pairs": 6, "update.onpolicy_min_margin": 0.0, "gate.reward_tolerance": 1.0}

    def cycle(seed: int, **dotted) -> tuple[dict, dict[str, str]]:
        seed_feedback(r, 16 if seed == 0 else 8, seed=seed)
        threads: dict[str, str] = {}
        progress = lambda stage, info: threads.setdefault(stage, threading.current_thread().name)  # noqa: E731
        report = run_cycle(r, settings, algorithm_cycle("dpo", **on, **dotted), progress=progress)
        assert report["status"] == "published", report
        return registry.get_version(r, report["version"])["update"]["data"]["onpolicy"], threads

    judged, threads = cycle(0)
    assert judged["judge_reward_version"] == registry.current_reward_version(r) == 1
    assert threads["reward"] == threads["dpo"] == threading.current_thread().name

    judged, threads = cycle(1)
    assert judged["judge_reward_version"] == 1 and registry.current_reward_version(r) == 2 and judged["pairs"] >= 1
    assert threads["reward"] == "beside" and threads["dpo"] == threading.current_thread().name

    judged, threads = cycle(2, **{"update.reward_beside": False})
    assert judged["judge_reward_version"] == registry.current_reward_version(r) == 3
    assert threads["reward"] == threads["dpo"] == threading.current_thread().name


def test_an_unknown_algorithm_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="ppo"):
        CycleConfig.from_dict({"update.algorithm": "sft"})


@pytest.mark.parametrize("algorithm", ["ppo", "dpo", "kto"])
def test_the_stretch_reaches_every_algorithm(r, redis_url, tmp_path, algorithm):
    """update.stretch (the demo's last cycle) multiplies the update's budget whatever the algorithm: PPO's seconds
    and steps, DPO's and KTO's seconds and epochs, and the loop then uses the longer budget."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_feedback(r, 32)
    budget = {"update.stretch": 2.0, "update.steps": 2}
    if algorithm != "ppo":
        budget |= {f"{algorithm}.max_steps": None, f"{algorithm}.epochs": 1, f"{algorithm}.batch_size": 8}
    cfg = (
        CycleConfig.from_dict(tiny_overrides(**budget)) if algorithm == "ppo" else algorithm_cycle(algorithm, **budget)
    )
    report = run_cycle(r, settings, cfg)
    assert report["status"] == "published", report
    info = registry.get_version(r, report["version"])["update"]
    if algorithm == "ppo":
        assert info["steps"] == 4  # update.steps 2, stretched
    else:
        assert info["config"]["max_seconds"] == 10.0 and info["config"]["epochs"] == 2, info["config"]
        assert info["metrics"]["epochs"] == 2  # one epoch configured, two trained


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_generic_preferences_join_the_update_as_their_share(r, redis_url, tmp_path, algorithm):
    """update.generic_share: the built-in world's generic preferences (held-out family left out) are that share of
    the update's items, recorded with the version."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    seed_feedback(r, 16)
    report = run_cycle(r, settings, algorithm_cycle(algorithm, **{"update.generic_share": 0.5}))
    assert report["status"] == "published", report
    data = registry.get_version(r, report["version"])["update"]["data"]
    data.pop("onpolicy", None)  # DPO's judged pairs (on by default) are not items of the share
    assert data == {"new": 16, "replay": 0, "generic": 16}, data  # half of 32 items


def test_generic_share_is_off_by_default_and_below_one():
    assert CycleConfig().update.generic_share == 0.0
    with pytest.raises(ValueError, match="generic_share"):
        CycleConfig.from_dict({"update.generic_share": 1.0})
