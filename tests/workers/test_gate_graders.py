"""A user gates their own model on their own graders: eval.suites in the cycle's configuration, the gate's
max_grader_drop check (workers/gate.py), and a real cycle on a tiny SFT model refusing a candidate that regressed on
the user's suite file."""

from __future__ import annotations

import json
import random

import pytest

from store import feedback as fb
from store import registry
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import make_settings, publish_tiny, seed_feedback, tiny_overrides
from training.evaluate import generate_responses
from workers.cycle import run_cycle
from workers.cycle_config import CycleConfig, GateConfig, load_cycle_config, with_suites
from workers.gate import gate, grader_regressions


def _metrics(graders: dict | None = None, reward_mean: float = 0.5) -> dict:
    m = {
        "reward_mean": reward_mean,
        "kl_to_ref": 1.0,
        "degenerate_share": 0.0,
        "length_mean": 10.0,
        "harmful_compliance": 0.0,
        "jailbreak_compliance": 0.05,
        "over_caution": 0.1,
        "score/mean": 0.6,
        # the world's paired checks see identical per-prompt outcomes: only the suites differ between the two
        "outcomes": {"harmful": [0] * 40, "over_caution": [0] * 10, "score": [1] * 20, "prompts": "same"},
    }
    return m | ({"graders": graders} if graders is not None else {})


def _suite(pass_rate: float, n: int = 40) -> dict:
    return {"n": n, "pass_rate": pass_rate, "score": pass_rate, "families": {}, "kinds": {}}


def test_the_gate_refuses_a_planted_drop_on_a_user_suite():
    parent = _metrics({"mine": _suite(0.80), "other": _suite(0.5)}, reward_mean=0.0)
    dropped = _metrics({"mine": _suite(0.70), "other": _suite(0.5)})
    passed, reasons, numbers = gate(dropped, parent, GateConfig())
    assert not passed and len(reasons) == 1
    assert "grader suite 'mine'" in reasons[0] and "80.0% → 70.0%" in reasons[0]
    assert numbers["graders"]["mine"] == {"pass_rate": 0.70, "parent_pass_rate": 0.80, "n": 40}
    # within the tolerance it passes, and the threshold is the config's
    assert gate(_metrics({"mine": _suite(0.76), "other": _suite(0.5)}), parent, GateConfig())[0]
    assert gate(dropped, parent, GateConfig(max_grader_drop=0.1))[0]
    # a suite the parent was never scored on is not compared; no suites at all is today's gate
    assert grader_regressions(_metrics({"new": _suite(0.0)}), _metrics(), GateConfig(), {}) == []
    assert gate(_metrics(), _metrics(reward_mean=0.0), GateConfig())[0]


def test_eval_suites_in_the_cycle_config(tmp_path, redis_url):
    settings = make_settings(tmp_path / "home", redis_url)
    settings.home.mkdir(parents=True)
    (settings.home / "mine.jsonl").write_text(
        json.dumps({"id": "a", "prompt": "Say a number.", "grader": {"type": "numeric", "answer": 7}}) + "\n"
    )
    cfg = load_cycle_config(settings, {"eval.suites": ["mine.jsonl"], "gate.max_grader_drop": 0.1})
    assert cfg.eval.suites == [str(settings.home / "mine.jsonl")]  # relative to ALIGND_HOME, where cycle.json is
    assert cfg.gate.max_grader_drop == 0.1
    with pytest.raises(ValueError, match="eval.suites="):
        CycleConfig.from_dict({"eval.suites": "mine.jsonl"})  # a path, not a list of paths
    with pytest.raises(ValueError, match="gate.max_grader_drop=-0.1"):
        CycleConfig.from_dict({"gate.max_grader_drop": -0.1})
    (settings.home / "bad.jsonl").write_text('{"id": "a", "prompt": "Q", "grader": {"type": "exact"}}\n')
    with pytest.raises(ValueError, match=r"(?s)eval.suites: .*bad\.jsonl:1: exact grader: missing field 'answer'"):
        load_cycle_config(settings, {"eval.suites": ["bad.jsonl"]})
    with pytest.raises(ValueError, match="cannot read"):
        with_suites(CycleConfig.from_dict({"eval.suites": ["missing.jsonl"]}), settings)


PROMPTS = [f"What is {a} plus {b}?" for a in range(4) for b in range(5)] + ["Say a number."]


@pytest.fixture
def home(r, redis_url, tmp_path):
    """A deployment whose version 1 is a tiny SFT model, and a user's suite that version 1 passes in full: its own
    greedy answers, checked exactly (any answer the candidate changes is a failure)."""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    answers = generate_responses(
        tiny_sft_model("gpt2", seed=0, steps=30), tiny_tokenizer(), PROMPTS, max_new_tokens=8, batch_size=32
    )
    lines = [
        {"id": f"q{i}", "prompt": p, "grader": {"type": "exact", "answer": a}, "family": "sums"}
        for i, (p, a) in enumerate(zip(PROMPTS, answers))
    ]
    (settings.home / "mine.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return settings


def _cycle(**dotted) -> CycleConfig:
    # eval.max_new_tokens 8: the length the suite's answers were generated with
    return CycleConfig.from_dict(tiny_overrides(**{"eval.suites": ["mine.jsonl"], **dotted}))


def test_a_cycle_refuses_a_candidate_that_regressed_on_the_users_suite(r, home):
    seed_feedback(r, 12)
    # a learning rate that wrecks the policy: every other check is open, only the user's suite can refuse it
    report = run_cycle(r, home, _cycle(**{"ppo.lr": 0.5, "gate.max_grader_drop": 0.05, "gate.fallback": False}))
    assert report["status"] == "gate_failed", report
    assert len(report["reasons"]) == 1 and "grader suite 'mine'" in report["reasons"][0], report["reasons"]
    compared = report["gate"]["graders"]["mine"]
    assert compared["parent_pass_rate"] == 1.0 and compared["pass_rate"] < 0.95 and compared["n"] == len(PROMPTS)
    assert registry.current_version(r) == 1 and fb.unconsumed_count(r) == 0  # the recorded failure used them


def test_a_published_version_records_its_suite_scores(r, home):
    seed_feedback(r, 12)
    report = run_cycle(r, home, _cycle(**{"gate.max_grader_drop": 1.0}))
    assert report["status"] == "published", report
    metrics = registry.get_version(r, report["version"])["metrics"]
    mine = metrics["graders"]["mine"]
    assert mine["n"] == len(PROMPTS) and 0.0 <= mine["pass_rate"] <= 1.0
    assert mine["families"]["sums"]["n"] == len(PROMPTS) and mine["kinds"]["exact"]["n"] == len(PROMPTS)
    assert metrics["parent_eval"]["graders"]["mine"]["pass_rate"] == 1.0
    assert metrics["gate"]["graders"]["mine"]["parent_pass_rate"] == 1.0


def test_grader_reward_and_prompt_share_need_suites_and_fit_the_prompt_mix():
    with pytest.raises(ValueError, match="need grader suites in eval.suites"):
        CycleConfig.from_dict({"reward.grader_weight": 1.0})
    with pytest.raises(ValueError, match="update.grader_prompt_share=0.6 is out of range"):
        CycleConfig.from_dict({"eval.suites": ["x.jsonl"], "update.grader_prompt_share": 0.6})  # + 0.5 users > 1
    assert CycleConfig().reward.grader_weight == 0.0 and CycleConfig().update.grader_prompt_share == 0.0  # off


def test_ppo_prompts_mix_in_the_suites_prompts(r, home):
    from workers.ppo_update import prompt_sampler

    cfg = with_suites(_cycle(**{"update.grader_prompt_share": 0.25, "update.user_prompt_share": 0.0}), home)
    sampler, _ = prompt_sampler(r, tiny_tokenizer(), cfg)
    prompts = [m[-1]["content"] for m in sampler(400, random.Random(0))]
    from_suite = sum(p in PROMPTS for p in prompts)
    assert from_suite == 100  # exactly the share: the rest are world prompts, which never match the suite's
    assert len(set(p for p in prompts if p in PROMPTS)) > 10  # drawn across the suite, not one item


def test_a_cycle_with_the_grader_reward_publishes(r, home):
    seed_feedback(r, 12)
    dotted = {"reward.grader_weight": 1.0, "update.grader_prompt_share": 0.5, "gate.max_grader_drop": 1.0}
    report = run_cycle(r, home, _cycle(**dotted))
    assert report["status"] == "published", report
    assert registry.get_version(r, report["version"])["metrics"]["graders"]["mine"]["n"] == len(PROMPTS)


@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_a_preference_cycle_learns_from_the_policys_answers_ranked_by_the_graders(r, home, algorithm):
    """DPO and KTO have no reward to add a grader score to: with graders as reward the cycle samples the current
    policy on suite prompts, ranks the answers by the graders and trains on them beside the people's labels, and the
    version records what was sampled."""
    seed_feedback(r, 12)
    dotted = {
        "update.algorithm": algorithm,
        "reward.grader_weight": 2.0,
        "update.grader_prompt_share": 0.5,
        "gate.max_grader_drop": 1.0,
        f"{algorithm}.max_steps": 4,
        f"{algorithm}.max_seconds": 5.0,
    }
    report = run_cycle(r, home, _cycle(**dotted))
    assert report["status"] == "published", report
    info = registry.get_version(r, report["version"])["update"]
    assert info["algorithm"] == algorithm and info["data"]["new"] == 12
    grader = info["data"]["grader"]
    assert grader["prompts"] == 12 and grader["answers"] == 48 and grader["weight"] == 2.0  # 12 x 0.5 / (1 - 0.5)
    assert 0 < grader["pass_rate"] < 1 and grader["mixed_prompts"] >= 1 and grader["items"] >= 1
    # the graders' items were trained on: more items than the 12 people's labels give
    trained = info["metrics"]["n_train"] + info["metrics"]["n_heldout"]
    assert trained > (12 if algorithm == "dpo" else 24), info["metrics"]
