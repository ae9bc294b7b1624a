"""The cycle's config tree (workers/cycle_config.py): nested JSON and dotted keys address the same fields, from
cycle.json and overrides alike; unknown keys, old flat names and bad values are ValueErrors that say what to write;
pydantic checks the types (strictly: JSON gives any type) and ranges."""

from __future__ import annotations

import json

import pytest

from core.config import Settings
from training.reward import LIVE_FEEDBACK_LR, RANKED_PAIRS_LR, RewardConfig
from workers.cycle_config import CycleConfig, load_cycle_config


def test_nested_and_dotted_keys_set_the_same_fields():
    nested = CycleConfig.from_dict({"ppo": {"lr": 1e-3}, "gate": {"max_kl": 5.0}, "update": {"steps": 3}})
    dotted = CycleConfig.from_dict({"ppo.lr": 1e-3, "gate.max_kl": 5.0, "update.steps": 3})
    assert nested == dotted and nested.ppo.lr == 1e-3 and nested.gate.max_kl == 5.0 and nested.update.steps == 3
    assert nested.ppo.samples_per_prompt == CycleConfig().ppo.samples_per_prompt  # untouched fields keep defaults


def test_each_default_has_one_home():
    cfg = CycleConfig()
    assert cfg.reward.lr == LIVE_FEEDBACK_LR != RewardConfig().lr == RANKED_PAIRS_LR  # online vs offline labels
    assert cfg.eval.greedy is False and cfg.update.max_user_prompt_tokens == 128
    assert cfg.update.max_user_prompt_tokens != Settings().max_prompt_tokens  # a different limit, a different name


def test_cycle_json_then_overrides_merge_per_field(tmp_path):
    settings = Settings(home=tmp_path)
    (tmp_path / "cycle.json").write_text(json.dumps({"ppo": {"lr": 1e-3, "kl_coef": 0.2}, "max_events": 7}))
    cfg = load_cycle_config(settings, {"ppo.lr": 2e-3})
    assert cfg.ppo.lr == 2e-3 and cfg.ppo.kl_coef == 0.2 and cfg.max_events == 7


@pytest.mark.parametrize(
    "data, says",
    [
        ({"reward_lr": 1e-4}, "'reward_lr' is now 'reward.lr'"),
        ({"max_prompt_tokens": 64}, "'max_prompt_tokens' is now 'update.max_user_prompt_tokens'"),
        ({"ppo": {"learning_rate": 1e-4}}, "unknown CycleConfig key.*'ppo.learning_rate'.*'ppo.lr'"),
        ({"ppo.lr": "fast"}, "ppo.lr='fast': Input should be a valid number"),
        ({"ppo": {"lr": -1.0}}, "PPOConfig.lr=-1.0"),
        ({"reward": {"heldout_fraction": 1.5}}, "heldout_fraction=1.5"),
        ({"eval.n_per_family": 0}, "EvalConfig.n_per_family=0"),
        ({"update": {"user_prompt_share": 2}}, "update.user_prompt_share=2"),
        ({"gate.fallback": "yes"}, "gate.fallback='yes'"),
        ({"lock_ttl_s": 0}, "lock_ttl_s=0: Input should be greater than 0"),
        ({"update.algorithm": "sft"}, "update.algorithm='sft': Input should be 'ppo', 'dpo' or 'kto'"),
        ({"reward": {"epochs": "2"}}, "reward.epochs='2'"),  # a string where JSON should give a number
        ({"gate": {"max_kl": True}}, "gate.max_kl=True"),
        ({"max_events": 1.5}, "max_events=1.5"),
        ({"ppo": {"batch_size": 6, "mini_batch_size": 4}}, "not a multiple"),
    ],
)
def test_bad_keys_and_values_say_what_is_wrong(data, says):
    with pytest.raises(ValueError, match=says):
        CycleConfig.from_dict(data)


def test_a_bad_cycle_json_names_the_file(tmp_path):
    (tmp_path / "cycle.json").write_text(json.dumps({"ppo_lr": 1e-4}))
    with pytest.raises(ValueError, match=r"cycle\.json.*'ppo_lr' is now 'ppo.lr'"):
        load_cycle_config(Settings(home=tmp_path))
