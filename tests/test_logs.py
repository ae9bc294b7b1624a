"""Quiet logs: library output an operator cannot act on is off in every alignd process, and back on when asked."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from alignd.flower import StartupInspectFilter
from alignd.logs import QUIET_ENV, quiet_libraries

BUILD_REWARD_MODEL = """
import sys, tempfile
{prelude}
from tests.utils.tiny import tiny_model, tiny_tokenizer
from training.reward import build_reward_model
folder = tempfile.mkdtemp()
tiny_model().save_pretrained(folder)
tiny_tokenizer().save_pretrained(folder)
build_reward_model(folder, tiny_tokenizer())
"""


def test_quiet_libraries_sets_defaults_and_keeps_what_is_set():
    env = {"TRANSFORMERS_VERBOSITY": "warning"}
    quiet_libraries(env)
    assert env["TRANSFORMERS_VERBOSITY"] == "warning"  # the operator's choice wins
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == QUIET_ENV["HF_HUB_DISABLE_PROGRESS_BARS"]


@pytest.mark.slow
def test_an_alignd_process_builds_a_reward_model_without_load_report_or_bars():
    def stderr_of(prelude: str) -> str:
        env = {k: v for k, v in __import__("os").environ.items() if k not in QUIET_ENV}
        code = BUILD_REWARD_MODEL.format(prelude=prelude)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr

    plain = stderr_of("")  # transformers' defaults: what a newcomer's log showed on every cycle
    assert "LOAD REPORT" in plain and "MISSING" in plain and "Loading weights" in plain
    quiet = stderr_of("import alignd.commands.common")  # what every `alignd` command imports first
    assert "LOAD REPORT" not in quiet and "Loading weights" not in quiet and "Writing model shards" not in quiet


def test_flowers_startup_inspect_warnings_are_dropped_for_a_while_only():
    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("flower.inspector", logging.WARNING, __file__, 1, msg, (), None)

    starting = StartupInspectFilter(until=float("inf"))
    assert not starting.filter(record("Inspect method stats failed"))
    assert starting.filter(record("Connected to redis://…"))
    later = StartupInspectFilter(until=0.0)
    assert later.filter(record("Inspect method stats failed"))
