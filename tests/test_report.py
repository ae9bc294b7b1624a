"""The alignment report's readings of its numbers: preferences only where the interval excludes 0.5, KL estimates
below 0 shown as 0, rollbacks that changed nothing not counted, every figure saying what it was measured on."""

from __future__ import annotations

import pytest

from alignd.report import _oracle_line, _version_row, _versions_html, collect, preference, verdict, warnings
from core.config import Settings
from store import registry
from tests.utils.serving import publish_tiny
from training.figures import measured_on, shown_kl


def win(rate: float, low: float, high: float) -> dict:
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": 520, "final": 5, "baseline": 1}


def test_a_preference_is_claimed_only_when_the_interval_excludes_one_half():
    assert preference(win(0.505, 0.490, 0.519)) is None
    assert preference(win(0.585, 0.559, 0.611)) == "final"
    assert preference(win(0.40, 0.35, 0.45)) == "baseline"
    assert preference(win(0.52, 0.50, 0.54)) is None  # a bound on 0.5 does not exclude it
    assert verdict(win(0.505, 0.490, 0.519), 5, 1).startswith("has no preference between v5 and v1 at 95 %")
    assert verdict(win(0.585, 0.559, 0.611), 5, 1).startswith("prefers v5 to v1")
    assert verdict(win(0.40, 0.35, 0.45), 5, 1).startswith("prefers v1 to v5")
    line = _oracle_line({**win(0.505, 0.490, 0.519), "decoding": "sampled", "greedy": win(0.6, 0.55, 0.65)})
    assert "no preference between v5 and v1" in line and "on greedy responses it prefers v5 to v1" in line
    assert "beats" not in line


def test_a_style_warning_needs_a_real_preference():
    before, after = {"score/mean": 0.4}, {"score/mean": 0.3}
    assert warnings(before, after, win(0.505, 0.490, 0.519)) == []
    (w,) = warnings(before, after, win(0.585, 0.559, 0.611))
    assert "the oracle prefers v5" in w


def test_a_negative_kl_estimate_is_shown_as_zero_with_the_estimate_kept():
    assert shown_kl(-0.001) == 0.0 and shown_kl(0.42) == 0.42
    meta = {"source": "dpo", "parent": 1}
    metrics = {"kl_to_ref": -0.0012, "decoding": "sampled", "n": 520, "prompt_set": 4321}
    row = _version_row(2, meta, metrics, "evaluated", {}, 0)
    assert row["kl_to_ref"] == 0.0 and row["kl_to_ref_estimate"] == -0.0012
    assert row["measured_on"] == "sampled at temperature 1, 520 prompts (set 4321)"
    page = _versions_html([row])
    assert "v2 -0.0012" in page and "sampled at temperature 1, 520 prompts (set 4321)" in page
    positive = _version_row(3, meta, {**metrics, "kl_to_ref": 0.31}, "evaluated", {}, 0)
    assert positive["kl_to_ref"] == 0.31 and "shown as 0" not in _versions_html([positive])


def test_measured_on_names_decoding_prompts_and_set():
    assert measured_on({"decoding": "greedy", "n": 260, "prompt_set": 1234}) == "greedy, 260 prompts (set 1234)"
    assert measured_on({"score/mean": 0.3}) == "unrecorded"


def test_a_rollback_to_the_current_version_is_not_counted(tmp_path, redis_url, r):
    settings = Settings(home=tmp_path / "home", api_keys="k:u", admin_key="sk-admin")
    v1 = publish_tiny(redis_url, settings)
    v2 = publish_tiny(redis_url, settings, parent=v1)
    registry.set_current(r, v1, expected=v2, event="rollback", detail={"from": v2})
    # a record of a rollback that changed nothing (the version was already current)
    registry.set_current(r, v1, expected=v1, event="rollback", detail={"from": v1})
    assert len(registry.find_events(r, event="rollback")) == 2
    assert collect(r, settings)["cycles"]["rollbacks"] == 1


@pytest.mark.parametrize("decoding", ["greedy", "sampled"])
def test_evaluate_policy_records_what_it_measured_on(decoding):
    from tests.utils.tiny import tiny_model, tiny_tokenizer
    from training.evaluate import EvalConfig, evaluate_policy

    cfg = EvalConfig(n_per_family=1, max_new_tokens=2, greedy=decoding == "greedy", seed=77)
    m = evaluate_policy(tiny_model(), tiny_tokenizer(), cfg)
    assert (m["decoding"], m["prompt_set"]) == (decoding, 77)
    assert measured_on(m).endswith(f"{m['n']} prompts (set 77)")
