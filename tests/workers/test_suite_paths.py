"""Grader suites (eval.suites) name Python callables that training imports and runs, so a cycle configuration may
only name suite files inside ALIGND_HOME (after symlinks): `alignd train cycle --config` exits 2 saying so, a
cycle.json naming one is refused by the cycle before it takes the lock or any feedback, and the grader module of
the planted suite is never imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core import names
from store import feedback, keys
from tests.workers.helpers import ROOT, env_for, make_settings, seed_feedback
from workers.cycle import run_cycle
from workers.cycle_config import load_cycle_config


def _plant(folder, marker):
    """A suite outside the home whose grader module, once imported, leaves `marker`: the attack to stop."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "planted_grader.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n\ndef grade(prompt, response, item):\n    return 1.0\n"
    )
    grader = {"type": "callable", "python": "planted_grader:grade"}
    (folder / "evil.jsonl").write_text(json.dumps({"id": "x", "prompt": "Hi", "grader": grader}) + "\n")
    return folder / "evil.jsonl"


@pytest.fixture
def home(tmp_path, redis_url):
    settings = make_settings(tmp_path / "home", redis_url)
    settings.home.mkdir(parents=True)
    return settings


def test_the_cli_refuses_suites_outside_the_home(home, tmp_path):
    marker = tmp_path / "imported.txt"
    evil = _plant(tmp_path / "elsewhere", marker)
    (home.home / "suites").mkdir()
    (home.home / "suites" / "link.jsonl").symlink_to(evil)  # inside by name, outside once resolved
    env = env_for(home, PYTHONPATH=f"{ROOT}:{evil.parent}")  # the module is importable: only the check stops it
    tries = [([str(evil)], []), (["suites/link.jsonl"], []), (["../elsewhere/evil.jsonl"], ["--enqueue"])]
    for suites, extra in tries:  # --enqueue: refused here, not by the worker after a 202-like "enqueued"
        cmd = [sys.executable, "-m", "alignd.cli", "train", "cycle", *extra, "--config"]
        cmd.append(json.dumps({"eval.suites": suites}))
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (suites, extra, done.stdout, done.stderr)
        assert "outside ALIGND_HOME" in done.stderr.replace("\n", " ").replace("│", ""), done.stderr
    assert not marker.exists()


def test_a_cycle_json_naming_a_suite_outside_the_home_is_refused_before_training(r, home, tmp_path):
    marker = tmp_path / "imported.txt"
    evil = _plant(tmp_path / "elsewhere", marker)
    sys.path.insert(0, str(evil.parent))
    try:
        seed_feedback(r, 3)
        (home.home / "cycle.json").write_text(json.dumps({"eval": {"suites": [str(evil)]}}))
        with pytest.raises(ValueError, match="outside ALIGND_HOME"):
            run_cycle(r, home, min_events=0)
        assert feedback.unconsumed_count(r) == 3 and not r.exists(keys.lock(names.TRAIN_LOCK))
        assert not marker.exists()
    finally:
        sys.path.remove(str(evil.parent))
    (home.home / "cycle.json").unlink()
    inside = home.home / "suites" / "mine.jsonl"
    inside.parent.mkdir()
    inside.write_text(json.dumps({"id": "a", "prompt": "Hi", "grader": {"type": "exact", "answer": "Hello"}}) + "\n")
    cfg = load_cycle_config(home, {"eval.suites": ["suites/mine.jsonl"]})  # inside the home: accepted
    assert cfg.eval.suites == [str(inside)]
