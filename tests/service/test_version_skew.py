"""/readyz when API processes serve different versions (service/skew.py): two real `alignd serve` processes on one
registry, one on a host whose checkpoint root lacks the new version (it refuses it and keeps serving the old one).
A swap in progress is ready; a split past the grace is 503 on every process, naming who serves what; a rollback
heals it; a version every process refuses alike keeps them ready (they serve the previous version consistently)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import httpx
import pytest

from core.redis_server import free_port
from store import registry
from tests.workers.helpers import ROOT, env_for, make_settings, publish_tiny, stop, wait_for, wait_http

pytestmark = pytest.mark.slow

SMOKE_S = 3  # grace = 5 polls of 0.2 s + the smoke-test bound = 4 s


def _serve(settings, log, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "alignd.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    env = env_for(settings, ALIGND_SMOKE_TEST_TIMEOUT_S=str(SMOKE_S), **env)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True
    )
    return proc, f"http://127.0.0.1:{port}"


def _ready(url: str) -> tuple[int, dict]:
    resp = httpx.get(f"{url}/readyz", timeout=10)
    return resp.status_code, resp.json()


def test_readyz_reports_processes_split_between_versions(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)
    other_root = tmp_path / "other-host-checkpoints"  # a second host's mount: a copy holding only v1
    shutil.copytree(settings.checkpoints_dir, other_root)
    a, url_a = _serve(settings, tmp_path / "a.log")
    b, url_b = _serve(settings, tmp_path / "b.log", ALIGND_CHECKPOINT_ROOT=str(other_root))
    try:
        wait_http(url_a, 120)
        wait_http(url_b, 120)
        who_b = f"{socket.gethostname()}:{_ready(url_b)[1]['pid']}"

        v2 = publish_tiny(r, settings, seed=1, parent=1)
        status, body = _ready(url_a)  # a swap in progress is normal
        assert status == 200 and "version_skew" not in body, body

        def split() -> dict | None:
            status, body = _ready(url_a)
            return body if status == 503 else None

        body = wait_for(split, 60, what="/readyz 503 while B serves v1")
        skew = body["version_skew"]
        assert skew["split"] and skew["current"] == v2 and skew["serving"][who_b] == 1
        assert list(skew["lagging"]) == [who_b] and "serves v1, not the current v2" in skew["lagging"][who_b]
        assert "refused" in skew["lagging"][who_b] and body["policy_version"] == v2
        assert _ready(url_b)[0] == 503  # every process says so, the lagging one too

        registry.set_current(r, 1, expected=v2, event="rollback")
        wait_for(lambda: _ready(url_a)[0] == 200 and _ready(url_b)[0] == 200, 60, what="both ready after rollback")

        v3 = registry.allocate_version(r)  # a version no host has: every process refuses it alike
        registry.add_version(r, v3, {"source": "ppo", "parent": 1, "path": f"v{v3}-never-written", "metrics": {}})
        registry.set_current(r, v3, expected=1)

        def uniform() -> dict | None:
            status, body = _ready(url_a)
            return body if status == 200 and len(body.get("version_skew", {}).get("lagging", {})) == 2 else None

        body = wait_for(uniform, 60, what="both processes listed as lagging, still ready")
        assert body["version_skew"]["split"] is False and set(body["version_skew"]["serving"].values()) == {1}
    finally:
        stop(a)
        stop(b)
    for log in ("a.log", "b.log"):
        assert "Traceback" not in (tmp_path / log).read_text(), (tmp_path / log).read_text()[-3000:]
