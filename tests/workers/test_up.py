"""`alignd up` starts the API, a training worker, a light worker, beat and Flower (basic auth) as child processes
and stops them all on Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import celery
import httpx
import pytest

from tests.conftest import free_port
from tests.workers.helpers import ROOT, celery_client, env_for, make_settings, publish_tiny, wait_for, wait_http

pytestmark = pytest.mark.slow


def test_up_runs_every_process_and_ctrl_c_stops_them(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(r, settings)  # registered: `up` skips the bootstrap
    api_port, flower_port = free_port(), free_port()
    env = env_for(settings, ALIGND_FLOWER_PORT=str(flower_port))
    env.pop("FLOWER_BASIC_AUTH", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "alignd.cli", "up", "--port", str(api_port)],
        cwd=ROOT,
        env=env,
        stdout=open(tmp_path / "up.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    probe = celery_client(redis_url)
    try:
        wait_http(f"http://127.0.0.1:{api_port}", timeout=120)
        flower = f"http://127.0.0.1:{flower_port}/"
        wait_for(lambda: _status(flower) == 401, 90, what="Flower asking for credentials")
        user, _, password = json.loads((settings.home / "flower.json").read_text())["basic_auth"].partition(":")
        assert httpx.get(flower, auth=(user, password), timeout=5).status_code == 200
        assert password in (tmp_path / "up.log").read_text()  # printed for the operator
        names = wait_for(
            lambda: _workers(probe) if len(_workers(probe)) == 2 else None,
            90,
            interval=1,
            what="both workers answering",
        )
        assert {n.split("@")[0] for n in names} == {"train", "default"}
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(timeout=60)
    assert code == 0 and "stopped" in (tmp_path / "up.log").read_text()
    assert _status(f"http://127.0.0.1:{api_port}/healthz") is None and _status(flower) is None
    assert _workers(probe) == []
    probe.close()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def _workers(app: celery.Celery) -> list[str]:
    return sorted(name for reply in app.control.ping(timeout=1.0) for name in reply)
