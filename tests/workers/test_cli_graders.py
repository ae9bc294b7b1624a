"""`alignd graders check|world` and `alignd eval --suite` through the real typer app, on a tiny SFT version."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignd.cli import app
from core.config import get_settings
from tests.utils.tiny import tiny_sft_model, tiny_tokenizer
from tests.workers.helpers import env_for, make_settings, publish_tiny
from training.evaluate import generate_responses
from training.graders import grade, load_suite


@pytest.fixture
def cli(r, redis_url, tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "home", redis_url)
    for k, v in env_for(settings).items():
        if k.startswith("ALIGND_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    publish_tiny(r, settings)
    runner = CliRunner()
    yield settings, lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    get_settings.cache_clear()


def _suite(path, answers: dict[str, int]):
    lines = [
        {"id": f"q{i}", "prompt": p, "grader": {"type": "numeric", "answer": a}, "family": "sums" if i % 2 else "x"}
        for i, (p, a) in enumerate(answers.items())
    ]
    lines.append({"id": "polite", "prompt": "Say a number.", "grader": {"type": "must-not-refuse"}})
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_check_world_and_eval(r, cli, tmp_path):
    settings, run = cli
    sums = {f"What is {a} plus {b}?": a + b for a in range(3) for b in range(4)}
    path = _suite(tmp_path / "sums.jsonl", sums)

    out = run("graders", "check", path, "--json")
    assert out.exit_code == 0, out.output
    [counts] = json.loads(out.stdout)
    assert counts["items"] == len(sums) + 1 and counts["kinds"] == {"numeric": len(sums), "must-not-refuse": 1}

    out = run("graders", "world", "--out", tmp_path / "world.jsonl", "--per-family", 2)
    assert out.exit_code == 0 and len(load_suite(tmp_path / "world.jsonl").items) == 26

    out = run("eval", "--suite", path, "--max-new-tokens", 8)
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["version"] == 1 and set(result["suites"]) == {"sums"}
    # the same numbers as grading the version's own greedy answers directly (publish_tiny: 30 SFT steps)
    suite = load_suite(path)
    prompts = [it.prompt for it in suite.items]
    answers = generate_responses(tiny_sft_model(steps=30), tiny_tokenizer(), prompts, max_new_tokens=8, batch_size=32)
    want = grade(suite, answers).metrics()
    assert result["suites"]["sums"] == json.loads(json.dumps(want))
    assert result["suites"]["sums"]["kinds"]["must-not-refuse"]["pass_rate"] == 1.0

    assert run("eval", "--suite", path, "--version", 7).exit_code == 2


def test_a_bad_suite_file_is_named_line_by_line_and_nothing_runs(cli, tmp_path):
    _, run = cli
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "Q", "grader": {"type": "regex", "pattern": "("}}\n{oops\n')
    for args in (("graders", "check", bad), ("eval", "--suite", bad)):
        out = run(*args)
        assert out.exit_code == 1
        assert f"{bad}:1: bad regex" in out.stderr and f"{bad}:2: bad JSON" in out.stderr
        assert out.stdout == ""
