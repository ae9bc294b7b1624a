"""`alignd serve --workers 2`: two API processes share the port, each with its own engine and registry follower, and
both swap to a version published while they run."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from core.redis_server import free_port
from tests.workers.helpers import ROOT, env_for, make_settings, publish_tiny, stop, wait_for, wait_http


def _pids_serving(url: str, version: int, tries: int = 40) -> set[int]:
    """The API processes seen answering /readyz with `version` over `tries` fresh connections."""
    seen = set()
    for _ in range(tries):
        with httpx.Client(timeout=5) as c:  # a new connection each time: the kernel spreads them over the workers
            body = c.get(f"{url}/readyz").json()
        if body.get("policy_version") == version:
            seen.add(body["pid"])
    return seen


@pytest.mark.slow
def test_two_api_processes_each_follow_the_registry(r, redis_url, tmp_path):
    """(`r` empties the session's Redis first: a registry left by an earlier test made our version 1 a version 2.)"""
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "alignd.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"]
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env_for(settings), stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_http(url, timeout=120)
        try:  # each process loads torch and the model itself: on a loaded 2-core CI machine that can take a while
            wait_for(lambda: len(_pids_serving(url, 1)) == 2, 120, what="both API processes serving v1")
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; serving: {_pids_serving(url, 1)}; log:\n{log.read_text()[-4000:]}") from None
        v2 = publish_tiny(r, settings, seed=1, parent=1)
        t0 = time.monotonic()
        wait_for(
            lambda: len(_pids_serving(url, v2)) == 2 and not _pids_serving(url, 1, tries=20),
            60,
            what="both API processes serving v2",
        )
        assert time.monotonic() - t0 < 60
        with httpx.Client(timeout=30, headers={"Authorization": "Bearer sk-test-alice"}) as c:
            answer = c.post(
                f"{url}/v1/chat/completions",
                json={"model": "alignd", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]},
            )
        assert answer.status_code == 200, answer.text
        assert answer.json()["system_fingerprint"] == f"alignd-v{v2}"
    finally:
        stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
