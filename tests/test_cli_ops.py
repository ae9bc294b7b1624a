"""The operator's commands as a newcomer meets them: run as processes whose output goes to a pipe (a log file), not a
terminal — tables whole, keys labelled, a rollback to the current version a no-op, Flower quiet on start and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from core.config import Settings
from store import registry
from store.client import connect
from tests.utils.tiny import tiny_model, tiny_tokenizer
from workers.publish import publish_version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"score/mean": 0.343, "kl_to_ref": -0.0011, "decoding": "sampled", "n": 312, "prompt_set": 10007}


@pytest.fixture
def deployment(tmp_path, redis_url, r):
    settings = Settings(home=tmp_path / "home", redis_url=redis_url, api_keys="sk-alignd-t:user", admin_key="sk-adm")
    model, tok = tiny_model(), tiny_tokenizer()
    for parent in (None, 1):
        publish_version(
            connect(redis_url),
            settings,
            lambda d: (model.save_pretrained(d), tok.save_pretrained(d)),
            {"source": "test", "parent": parent, "metrics": METRICS},
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_") and k != "COLUMNS"}
    env.update(
        ALIGND_HOME=str(settings.home),
        ALIGND_REDIS_URL=redis_url,
        ALIGND_API_KEYS=settings.api_keys,
        ALIGND_ADMIN_KEY=settings.admin_key,
        PYTHONPATH=ROOT,
    )
    return env


def alignd(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_versions_table_fits_a_log_and_says_what_it_measured_on(deployment):
    out = alignd(deployment, "versions")
    assert out.returncode == 0, out.stderr
    header = next(line for line in out.stderr.splitlines() if "version" in line and "status" in line)
    for col in ("version", "status", "source", "parent", "reward", "events", "annotators", "score", "kl", "arena"):
        assert f" {col} " in header, header
    assert "…" not in out.stderr
    assert "sampled at temperature 1, 312 prompts (set 10007)" in out.stderr
    assert "0.343" in out.stderr and "-0.001" not in out.stderr  # a KL estimate below 0 is shown as 0


def test_keys_are_labelled_once(deployment):
    out = alignd(deployment, "keys")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["key for user: sk-alignd-t", "admin key: sk-adm"]


def test_a_rollback_to_the_current_version_changes_and_records_nothing(deployment, r):
    out = alignd(deployment, "rollback", "2")
    assert out.returncode == 0 and "already current" in out.stderr
    assert registry.find_events(r, event="rollback") == [] and registry.current_version(r) == 2
    assert alignd(deployment, "rollback", "1").returncode == 0 and registry.current_version(r) == 1


@pytest.mark.slow
def test_flower_starts_without_inspect_warnings_and_stops_once_on_repeated_ctrl_c(deployment, tmp_path):
    log = tmp_path / "flower.log"
    env = {**deployment, "ALIGND_FLOWER_PORT": "0"}
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignd.cli", "flower"], env=env, stdout=f, stderr=f, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while "Connected to" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # Flower's first inspection of the (absent) workers times out after 1 s
        # Ctrl-C on a terminal signals the whole process group, and `alignd flower` forwards it: two interrupts at
        # least, more from an impatient operator, some landing while the first is being handled
        for _ in range(3):
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "Connected to" in text
    assert "Inspect method" not in text and "Traceback" not in text and "Aborted" not in text
