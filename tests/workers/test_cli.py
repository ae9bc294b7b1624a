"""The online loop's commands (alignd/commands/) through the real `alignd` typer app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignd.cli import app
from alignd.commands.run import children
from core.config import get_settings
from store import registry
from tests.workers.helpers import env_for, make_settings, publish_tiny, seed_feedback, write_cycle_config


@pytest.fixture
def cli(r, redis_url, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", redis_url)
    for k, v in env_for(settings).items():
        if k.startswith("ALIGND_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    write_cycle_config(settings.home)
    publish_tiny(r, settings)
    runner = CliRunner()
    yield settings, lambda *args: runner.invoke(app, list(args), catch_exceptions=False)
    get_settings.cache_clear()


def test_train_cycle_versions_and_rollback(r, cli):
    settings, run = cli
    seed_feedback(r, 8)
    out = run("train", "cycle", "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == "published" and report["version"] == 2 and report["feedback"]["events"] == 8

    out = run("train", "ppo", "--steps", "1", "--json")
    ppo = json.loads(out.stdout.strip().splitlines()[-1])
    assert ppo["status"] == "published" and ppo["version"] == 3 and ppo["feedback"]["events"] == 0
    assert ppo["ppo"]["resumed"] and registry.get_version(r, 3)["parent"] == 2

    listing = json.loads(run("versions", "--json").stdout)
    assert listing["current"] == 3 and [v["version"] for v in listing["data"]] == [1, 2, 3]
    assert [v["status"] for v in listing["data"]] == ["available", "available", "current"]

    out = run("rollback", "1")
    assert out.exit_code == 0 and registry.current_version(r) == 1
    assert registry.find_events(r, event="rollback", version=1)[0]["from"] == 3
    assert run("rollback", "42").exit_code == 2 and registry.current_version(r) == 1


def test_train_reward_from_a_file_keeps_the_better_model(r, cli, tmp_path):
    settings, run = cli
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} plus 1?"}], "chosen": f"The answer is {a + 1}.",
             "rejected": f"The answer is {a + 7}."} for a in range(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    first = json.loads(run("train", "reward", "--data", str(data), "--json").stdout.strip().splitlines()[-1])
    assert first["accepted"] and first["version"] == 1 and first["n_comparisons"] == 12
    strict = json.dumps({"gate": {"reward_tolerance": -1.0}})
    second = json.loads(run("train", "reward", "--data", str(data), "--config", strict, "--json")
                        .stdout.strip().splitlines()[-1])
    assert not second["accepted"] and registry.current_reward_version(r) == 1


def test_up_children_are_a_single_train_worker_a_light_worker_beat_and_flower():
    cmds = children(["alignd"])
    assert set(cmds) == {"worker-train", "worker", "beat", "flower"}
    train = cmds["worker-train"]
    assert train[train.index("--queues") + 1] == "train" and train[train.index("--concurrency") + 1] == "1"
    assert cmds["worker"][cmds["worker"].index("--queues") + 1] == "default"
