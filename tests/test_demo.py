"""The demo end to end with tiny budgets: real processes (`alignd up`: API, Celery workers, beat, Flower), simulated
users over HTTP, training cycles through POST /admin/train and the Celery train queue, hot-swaps, the report."""

from __future__ import annotations

import json

import httpx
import pytest

from alignd.demo import DemoConfig, brief, run_demo
from alignd.report import FIGURES, ReportConfig
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer


# CycleConfig overrides (workers/cycle.py): seconds per cycle, gate open, so the test checks the plumbing
TINY_CYCLE = {"lock_ttl_s": 10.0, "reward_seconds": 3.0, "reward_batch_size": 8, "ppo_steps": 2, "ppo_seconds": 20.0,
              "ppo_batch_size": 4, "ppo_mini_batch_size": 2, "ppo_epochs": 1, "ppo_max_new_tokens": 10,
              "eval_per_family": 1, "eval_max_new_tokens": 8, "min_reward_gain": -1e9, "max_kl": 1e9,
              "max_degenerate_share": 1.0, "max_length_drift": 1e9, "ppo_lr": 1e-3,
              "max_harmful_increase": 1.0, "max_over_caution_increase": 1.0, "max_score_drop": 1.0}


@pytest.fixture
def base_model(tmp_path):
    """A tiny SFT-ish model folder registered as version 1 (the built-in bootstrap takes minutes)."""
    path = tmp_path / "base"
    tiny_sft_model("gpt2", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_reduced_demo_publishes_swaps_and_reports(tmp_path, base_model):
    cfg = DemoConfig(minutes=1.0, cycles=3, users=4, home=tmp_path / "home", base=base_model, rate=20.0,
                     concurrency=4, first_feedback=24, min_feedback=12, threads=1, report_reserve_s=10.0,
                     cycle_config=TINY_CYCLE,
                     report=ReportConfig(eval_per_family=2, max_new_tokens=8, oracle=True))
    summary = run_demo(cfg, log=print)

    published = [c for c in summary["cycles"] if c["status"] == "published"]
    assert len(published) >= 3, summary["cycles"]
    assert all(c["swap_seconds"] is not None for c in published), published  # every version reached the users
    served = summary["simulation"]["served_versions"]
    assert all(str(c["version"]) in served for c in published)
    assert all(summary["simulation"]["feedback"][k] > 0 for k in ("thumbs", "pairwise", "rank"))
    assert summary["simulation"]["errors"]["total"] == 0, summary["simulation"]["errors"]

    report = summary["report"]
    out = tmp_path / "home" / "report"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["final_version"] == report["final_version"] == published[-1]["version"]
    assert set(FIGURES) <= set(on_disk["figures"])
    for fig in on_disk["figures"].values():
        assert (out / fig["file"]).read_bytes()[:4] == b"\x89PNG"
    rows = {row["version"]: row for row in on_disk["versions"]}
    assert {c["version"] for c in published} <= set(rows)
    for c in published:
        row = rows[c["version"]]
        assert row["metrics_source"] == "evaluated" and isinstance(row["score/mean"], float)
        assert row["feedback_events"] > 0 and row["annotators"]  # provenance: trained on simulated users' votes
        assert all(name.startswith("sim-") for name in row["annotators"])
        assert isinstance(row["reward_heldout_accuracy"], float)
    assert "win_rate" in on_disk["oracle"] and on_disk["oracle"]["baseline"] == 1
    assert on_disk["cycles"]["published"] == len(published)
    assert set(brief(summary)) >= {"cycles", "simulation", "before_after", "oracle", "targets"}
    with pytest.raises(httpx.HTTPError):  # everything it started is gone
        httpx.get(summary["simulation"]["url"] + "/healthz", timeout=2)
