"""The demo end to end with tiny budgets: real processes (`alignd up`: API, Celery workers, beat, Flower), simulated
users over HTTP, training cycles through POST /admin/train and the Celery train queue, hot-swaps, the report; that a
SIGTERM stops everything it started; and how it budgets its last cycle."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import httpx
import pytest
import redis

from alignd.demo import CYCLE_MARGIN, DemoConfig, brief, run_demo, stretch_overrides
from alignd.report import FIGURES, ReportConfig
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import tiny_overrides
from workers.cycle_config import CycleConfig

# the tests' tiny cycle (seconds per cycle, gate open: this checks the plumbing) with a demo's looser lock and budget
DEMO_CYCLE = tiny_overrides(**{"lock_ttl_s": 10.0, "update.seconds": 20.0})


@pytest.fixture
def base_model(tmp_path):
    """A tiny SFT-ish model folder registered as version 1 (the built-in bootstrap takes minutes)."""
    path = tmp_path / "base"
    tiny_sft_model("gpt2", seed=0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "algorithm, graders",
    [("ppo", False), ("dpo", True), ("kto", False)],
    ids=["ppo", "dpo-graders-as-reward", "kto"],
)
def test_reduced_demo_publishes_swaps_and_reports(tmp_path, base_model, algorithm, graders):
    cfg = DemoConfig(
        minutes=1.0,
        cycles=3,
        users=4,
        home=tmp_path / "home",
        base=base_model,
        rate=20.0,
        concurrency=4,
        first_feedback=24,
        min_feedback=12,
        threads=1,
        report_reserve_s=10.0,
        cycle_config={**DEMO_CYCLE, "update.algorithm": algorithm},
        report=ReportConfig(eval_per_family=2, max_new_tokens=8, oracle=True),
        graders_as_reward=graders,
        seed=7,
    )
    summary = run_demo(cfg, log=print)
    assert summary["seed"] == 7  # recorded with the run: runs are told apart by their seeds
    # what the three-seed table needs besides the report: the machine during cycles, the users' latency
    assert all(0 < c["cpu"]["busy_fraction"] <= 1 for c in summary["cycles"]), summary["cycles"]
    assert 0 < summary["cpu_busy_during_cycles"] <= 1
    latency = summary["serving_latency"]
    assert latency["n"] == summary["simulation"]["requests"] > 0
    assert 0 < latency["p50_ms"] <= latency["p99_ms"] and 0 < latency["during_cycles"]["n"] <= latency["n"]

    published = [c for c in summary["cycles"] if c["status"] == "published"]
    assert len(published) >= 3, summary["cycles"]
    assert all(c["swap_seconds"] is not None for c in published), published  # every version reached the users
    served = summary["simulation"]["served_versions"]
    assert all(str(c["version"]) in served for c in published)
    assert all(summary["simulation"]["feedback"][k] > 0 for k in ("thumbs", "pairwise", "rank"))
    assert summary["simulation"]["errors"]["total"] == 0, summary["simulation"]["errors"]
    assert all(c["update"]["algorithm"] == algorithm for c in published), [c["update"] for c in published]
    if graders:  # the built-in graders on training prompts joined every update, recorded with it
        assert (tmp_path / "home" / "graders-train.jsonl").exists() and summary["graders_as_reward"]
        assert all(c["update"]["data"]["grader"]["answers"] > 0 for c in published), published

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
        assert row["source"] == algorithm
        assert row["metrics_source"] == "evaluated" and isinstance(row["score/mean"], float)
        assert row["feedback_events"] > 0 and row["annotators"]  # provenance: trained on simulated users' votes
        assert all(name.startswith("sim-") for name in row["annotators"])
        assert isinstance(row["reward_heldout_accuracy"], float)
    assert "win_rate" in on_disk["oracle"] and on_disk["oracle"]["baseline"] == 1
    assert on_disk["cycles"]["published"] == len(published)
    assert set(brief(summary)) >= {"cycles", "simulation", "before_after", "oracle", "targets"}
    with pytest.raises(httpx.HTTPError):  # everything it started is gone
        httpx.get(summary["simulation"]["url"] + "/healthz", timeout=2)


def test_sigterm_stops_everything_the_demo_started(tmp_path, base_model):
    code = (
        f"from pathlib import Path\nfrom alignd.demo import DemoConfig, run_demo\n"
        f"run_demo(DemoConfig(minutes=10, users=2, home=Path({str(tmp_path / 'home')!r}), "
        f"base=Path({str(base_model)!r}), threads=1, first_feedback=10**9))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    urls: dict[str, str] = {}
    try:
        for line in proc.stderr:  # the demo logs where Redis and the API are, then waits for feedback forever
            for name, pattern in (("redis", r"Redis (redis://\S+)"), ("api", r"alignd is up on (http://\S+?);")):
                m = re.search(pattern, line)
                if m:
                    urls[name] = m.group(1)
            if "api" in urls:
                break
        assert set(urls) == {"redis", "api"}, urls
        assert httpx.get(urls["api"] + "/healthz", timeout=5).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(httpx.HTTPError):
        httpx.get(urls["api"] + "/healthz", timeout=2)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(urls["redis"], socket_connect_timeout=2).ping()


def test_only_the_last_cycle_that_fits_is_stretched():
    cfg = DemoConfig(cycles=3)
    # another cycle fits after this one: run it as configured
    assert stretch_overrides(remaining=600.0, last_cycle_s=120.0, n_done=3, cfg=cfg) == {}
    # fewer than the cycles asked for so far: never stretch (the loop overruns rather than do fewer)
    assert stretch_overrides(remaining=250.0, last_cycle_s=120.0, n_done=1, cfg=cfg) == {}
    # the first cycle has no duration to go by
    assert stretch_overrides(remaining=250.0, last_cycle_s=0.0, n_done=3, cfg=cfg) == {}
    # the last one: the update gets the spare time (its seconds, and the steps or epochs to use them)
    got = stretch_overrides(remaining=250.0, last_cycle_s=120.0, n_done=3, cfg=cfg)
    spare = (250.0 - CYCLE_MARGIN * 120.0) / CYCLE_MARGIN
    assert got == {"update.stretch": round((CycleConfig().dpo.max_seconds + spare) / CycleConfig().dpo.max_seconds, 3)}
    # the stretched cycle still ends inside the budget even if it runs CYCLE_MARGIN times as long as the last
    assert CYCLE_MARGIN * 120.0 + spare <= 250.0
    # hardly any spare time: nothing to give
    assert stretch_overrides(remaining=CYCLE_MARGIN * 120.0 + 5.0, last_cycle_s=120.0, n_done=3, cfg=cfg) == {}


def test_stretch_starts_from_the_runs_update_budget():
    for cycle_config, seconds in (
        ({"update": {"seconds": 30.0, "algorithm": "ppo"}}, 30.0),
        ({"update.algorithm": "kto", "kto.max_seconds": 40.0}, 40.0),
        ({"update.seconds": 20.0, "dpo.max_seconds": 50.0}, 50.0),  # DPO's budget, not PPO's
    ):
        cfg = DemoConfig(cycles=1, cycle_config=cycle_config)
        got = stretch_overrides(remaining=200.0, last_cycle_s=100.0, n_done=1, cfg=cfg)
        spare = (200.0 - CYCLE_MARGIN * 100.0) / CYCLE_MARGIN
        assert got == {"update.stretch": round((seconds + spare) / seconds, 3)}, cycle_config


def test_a_bad_cycle_config_fails_before_anything_starts(tmp_path):
    cfg = DemoConfig(home=tmp_path / "home", cycle_config={"reward_lr": 3e-4})
    with pytest.raises(ValueError, match="'reward_lr' is now 'reward.lr'"):
        run_demo(cfg, log=print)
    assert not (tmp_path / "home" / "logs").exists()  # nothing was started or written
