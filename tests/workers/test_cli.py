"""The online loop's commands (alignd/commands/) through the real `alignd` typer app."""

from __future__ import annotations

import gzip
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from alignd.cli import app
from alignd.commands.run import children
from core import names
from core.config import get_settings
from store import registry
from store.lock import FencedLock
from tests.workers.helpers import env_for, make_settings, publish_tiny, seed_feedback, write_cycle_config
from training.lora import adapter_base
from training.model import load_causal_lm
from training.preference import response_logprobs
from workers.cycle_config import SECTIONS, CycleConfig


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

    dpo_cycles = json.dumps({"update.algorithm": "dpo"})  # `train ppo` is PPO whatever the cycle's algorithm
    out = run("train", "ppo", "--steps", "1", "--json", "--config", dpo_cycles)
    ppo = json.loads(out.stdout.strip().splitlines()[-1])
    assert ppo["status"] == "published" and ppo["version"] == 3 and ppo["feedback"]["events"] == 0
    assert ppo["update"]["resumed"] and registry.get_version(r, 3)["parent"] == 2
    assert registry.get_version(r, 3)["source"] == "ppo"

    listing = json.loads(run("versions", "--json").stdout)
    assert listing["current"] == 3 and [v["version"] for v in listing["data"]] == [1, 2, 3]
    assert [v["status"] for v in listing["data"]] == ["available", "available", "current"]

    out = run("rollback", "1")
    assert out.exit_code == 0 and registry.current_version(r) == 1
    assert registry.find_events(r, event="rollback", version=1)[0]["from"] == 3
    assert run("rollback", "42").exit_code == 2 and registry.current_version(r) == 1


def test_train_reward_from_a_file_keeps_the_better_model(r, cli, tmp_path):
    settings, run = cli
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus 1?"}],
            "chosen": f"The answer is {a + 1}.",
            "rejected": f"The answer is {a + 7}.",
        }
        for a in range(12)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    first = json.loads(run("train", "reward", "--data", str(data), "--json").stdout.strip().splitlines()[-1])
    assert first["accepted"] and first["version"] == 1 and first["n_comparisons"] == 12
    strict = json.dumps({"gate": {"reward_tolerance": -1.0}})
    second = json.loads(
        run("train", "reward", "--data", str(data), "--config", strict, "--json").stdout.strip().splitlines()[-1]
    )
    assert not second["accepted"] and registry.current_reward_version(r) == 1


def test_up_children_are_a_single_train_worker_a_light_worker_beat_and_flower():
    cmds = children(["alignd"])
    assert set(cmds) == {"worker-train", "worker", "beat", "flower"}
    train = cmds["worker-train"]
    assert train[train.index("--queues") + 1] == "train" and train[train.index("--concurrency") + 1] == "1"
    assert cmds["worker"][cmds["worker"].index("--queues") + 1] == "default"


def sums(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(question, correct answer, plausible wrong answer) of the tiny model's task."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append((f"What is {a} plus {b}?", f"The answer is {a + b}.", f"The answer is {a + b + 1}."))
    return out


def write_hh_gz(path, rows) -> None:
    """A gzipped Anthropic HH-RLHF file, with one malformed line."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for q, good, bad in rows:
            f.write(
                json.dumps(
                    {
                        "chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                        "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}",
                    }
                )
                + "\n"
            )
        f.write("{truncated\n")


@torch.no_grad()
def preference_margin(settings, r, version: int, rows) -> float:
    model, tok = load_causal_lm(settings.checkpoint(registry.get_version(r, version)["path"]))
    prompts = [[{"role": "user", "content": q}] for q, _, _ in rows]
    good = response_logprobs(model, tok, [(p, g) for p, (_, g, _) in zip(prompts, rows)], 256)
    bad = response_logprobs(model, tok, [(p, b) for p, (_, _, b) in zip(prompts, rows)], 256)
    return float((good - bad).mean())


def last_json(out) -> dict:
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.strip().splitlines()[-1])


def fast(algorithm: str = "dpo") -> str:
    """`--config` for a few quick steps of `algorithm`: a section of the cycle's tree, as every train command takes."""
    return json.dumps({algorithm: {"beta": 0.5, "lr": 1e-3, "batch_size": 8, "max_steps": 8, "epochs": None}})


FAST = fast()


def test_train_dpo_and_kto_from_files_publish_with_provenance(r, cli, tmp_path):
    settings, run = cli
    rows = sums(40)
    hh = tmp_path / "hh-rlhf.jsonl.gz"
    write_hh_gz(hh, rows)
    dpo = last_json(run("train", "dpo", "--data", str(hh), "--seconds", "60", "--config", FAST, "--json"))
    assert dpo["status"] == "published" and dpo["version"] == 2 and registry.current_version(r) == 2
    assert dpo["data"] == {
        "file": str(hh),
        "format": "hh",
        "comparisons": 40,
        "rated": 0,
        "bad_lines": 1,
    }
    meta = registry.get_version(r, 2)  # on-policy pairs are on, but no reward model exists yet to judge them
    assert meta["update"]["data"]["onpolicy"]["skipped"] == "no reward model to judge with"
    assert (meta["source"], meta["parent"], meta["reference_version"]) == ("dpo", 1, 1)
    assert meta["update"]["config"]["beta"] == 0.5 and meta["update"]["metrics"]["steps"] == 8
    assert meta["annotators"] == {"import:hh-rlhf.jsonl.gz": 40} and meta["update"]["algorithm"] == "dpo"
    assert preference_margin(settings, r, 2, rows) > preference_margin(settings, r, 1, rows) + 0.3

    trl = tmp_path / "prefs.jsonl"  # TRL conversational format; its thumbs train KTO from the DPO policy
    trl.write_text(
        "".join(
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "chosen": [{"role": "assistant", "content": g}],
                    "rejected": [{"role": "assistant", "content": b}],
                }
            )
            + "\n"
            for q, g, b in sums(40, seed=1)
        )
    )
    kto = last_json(run("train", "kto", "--data", str(trl), "--config", fast("kto"), "--json"))
    meta = registry.get_version(r, kto["version"])
    assert kto["version"] == 3 and (meta["source"], meta["parent"], meta["reference_version"]) == ("kto", 2, 1)
    assert meta["data"]["format"] == "trl" and kto["update"]["metrics"]["train"]["n_desirable"] > 0

    assert meta["metrics"]["gate"]["eval_seed"] and "score/mean" in meta["metrics"]  # gated on the cycle's checkers

    reward = last_json(run("train", "reward", "--data", str(hh), "--json"))  # a gzipped HH-RLHF file
    assert reward["accepted"] and reward["n_comparisons"] == 40


def test_train_dpo_from_feedback_in_redis_and_its_refusals(r, cli, tmp_path):
    settings, run = cli
    empty = tmp_path / "nothing.jsonl"
    empty.write_text(json.dumps({"text": "hello"}) + "\n")
    out = run("train", "dpo", "--data", str(empty))
    assert out.exit_code == 2 and "no preference data" in out.output
    out = run("train", "dpo", "--config", json.dumps({"betta": 1}))
    assert out.exit_code == 2 and "betta" in out.output
    out = run("train", "dpo", "--config", FAST)
    assert out.exit_code == 2 and "no comparisons" in out.output and registry.current_version(r) == 1
    seed_feedback(r, 12)
    with FencedLock(r, names.TRAIN_LOCK, ttl_ms=30_000):  # a cycle in progress: wait for it, publish nothing
        out = run("train", "dpo", "--config", FAST)
    assert out.exit_code == 2 and "is held" in out.output and registry.current_version(r) == 1
    report = last_json(run("train", "dpo", "--config", FAST, "--json"))
    assert report["data"] == {"redis": True, "comparisons": 12, "rated": 0} and report["version"] == 2
    assert sorted(registry.get_version(r, 2)["annotators"]) == ["alice", "bob"]


def test_train_dpo_is_refused_by_the_cycle_gate_unless_told_otherwise(r, cli, tmp_path):
    settings, run = cli
    write_cycle_config(settings.home, **{"gate.max_kl": 1e-9})  # any change from the reference is over this budget
    hh = tmp_path / "hh.jsonl.gz"
    write_hh_gz(hh, sums(16))
    report = last_json(run("train", "dpo", "--data", str(hh), "--config", FAST, "--json"))
    assert report["status"] == "gate_failed" and any("KL" in x for x in report["reasons"])
    assert registry.current_version(r) == 1 and registry.find_events(r, event="gate_failed")[0]["source"] == "dpo"
    forced = last_json(run("train", "dpo", "--data", str(hh), "--config", FAST, "--no-gate", "--json"))
    assert forced["status"] == "published" and registry.get_version(r, forced["version"])["gate"].startswith("skipped")


def test_train_dpo_takes_the_cycles_adapter_decision_and_records_its_gate_failure_as_a_cycles(r, cli, tmp_path):
    settings, run = cli
    hh = tmp_path / "hh.jsonl.gz"
    write_hh_gz(hh, sums(16))
    lora = json.loads(FAST) | {"update.adapter": "lora", "lora.rank": 4, "lora.alpha": 8}
    report = last_json(run("train", "dpo", "--data", str(hh), "--config", json.dumps(lora), "--json"))
    meta = registry.get_version(r, report["version"])
    assert report["status"] == "published" and meta["adapter"] == meta["adapter"] | {"base_version": 1, "rank": 4}
    assert adapter_base(settings.checkpoint(meta["path"])) is not None  # the adapter alone, as a cycle publishes it

    closed = lora | {"gate.max_kl": 1e-9}
    failed = last_json(run("train", "dpo", "--data", str(hh), "--config", json.dumps(closed), "--json"))
    assert failed["status"] == "gate_failed" and registry.current_version(r) == report["version"]
    recorded = registry.cycle_event(r, failed["cycle"], "gate_failed")  # fenced by the lock's token, as a cycle's
    assert recorded["source"] == "dpo" and recorded["parent"] == report["version"]
    assert recorded["data"]["comparisons"] == 16 and recorded["annotators"] == {"import:hh.jsonl.gz": 16}


def test_train_cycle_with_no_new_feedback_publishes_nothing(r, cli):
    settings, run = cli
    report = last_json(run("train", "cycle", "--json"))
    assert report["status"] == "nothing_new" and report["reason"] == "no new feedback"
    assert registry.current_version(r) == 1 and len(registry.list_versions(r)) == 1


def test_config_prints_every_key_with_its_value_and_reason(cli):
    settings, run = cli
    tree = last_json(run("config", "--json"))
    rows = {row["key"]: row for row in tree["keys"]}
    assert set(rows) == set(CycleConfig.valid_keys()) and tuple(tree["sections"]) == SECTIONS
    algorithm = rows["update.algorithm"]
    assert (algorithm["type"], algorithm["value"]) == ("'ppo' | 'dpo' | 'kto'", "dpo")
    assert "DPO" in rows["update.algorithm"]["why"] and "Bonferroni" in rows["gate.significance"]["why"]
    assert "disjoint" in rows["eval.seed"]["why"]  # a training section's reason, from its field's comment
    assert "LIVE_FEEDBACK_LR" in tree["sections"]["reward"]  # why the cycle's reward section differs from its class
    effective = {row["key"]: row["value"] for row in last_json(run("config", "--effective", "--json"))["keys"]}
    assert effective["update.algorithm"] == "ppo" and effective["ppo.batch_size"] == 4  # ALIGND_HOME/cycle.json
    table = run("config")
    assert table.exit_code == 0 and "update.algorithm" in table.stdout and "Bonferroni" in table.stdout


def test_train_reward_warm_starts_from_the_previous_model_with_several_heads(r, cli, tmp_path):
    settings, run = cli
    rows = [
        {
            "prompt": [{"role": "user", "content": f"What is {a} plus 2?"}],
            "chosen": f"The answer is {a + 2}.",
            "rejected": f"The answer is {a + 5}.",
        }
        for a in range(12)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in rows))
    warm = json.dumps({"reward": {"warm_start": True, "heads": 2}})

    def train() -> dict:
        out = run("train", "reward", "--data", str(data), "--config", warm, "--json")
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = train(), train()
    assert first["metrics"]["warm_start"] is False and first["metrics"]["heads"] == 2  # nothing to start from
    assert second["metrics"]["warm_start"] is True and second["previous"] == first["version"]
    assert second["metrics"]["head_disagreement"] > 0
