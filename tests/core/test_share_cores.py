"""Sharing a machine: a training thread under `follow_load` runs on every core while `alignd serve` (a real process,
real HTTP) has no request in flight and on its share while one streams; and `alignd up` starts its training worker
at a lower priority without a fixed thread count."""

from __future__ import annotations

import os
import sys
import threading
import time

import httpx
import torch

from alignd.commands.run import spawn
from core.config import Settings
from core.redis_server import free_port
from core.threads import TRAIN_NICE, BusyFlag, api_busy, busy_dir, follow_load
from store.client import connect
from tests.workers.helpers import make_settings, publish_tiny, start_api, stop, wait_for, wait_http

# what a started process sees: its nice value, its torch threads, its OpenMP wait policy
PROBE = """import os, sys
get = os.environ.get
open(sys.argv[1], "w").write(f"{os.nice(0)} {get('ALIGND_TORCH_THREADS')} {get('OMP_WAIT_POLICY')}")
"""


def test_a_busy_mark_is_seen_until_it_is_cleared_and_a_stale_one_is_ignored(tmp_path):
    directory = busy_dir(tmp_path)
    busy = api_busy(directory)
    assert not busy()  # no API process ever ran here
    flag = BusyFlag(directory)
    flag.set(True)
    assert busy()
    flag.set(False)
    assert not busy()
    flag.set(True)
    (directory / "12345").touch()  # another process's mark, left behind when it was killed long ago
    os.utime(directory / "12345", (time.time() - 3600, time.time() - 3600))
    flag.clear()
    assert not busy()


def test_training_widens_while_the_api_idles_and_narrows_while_a_request_streams(r, redis_url, tmp_path):
    settings = make_settings(tmp_path / "home", redis_url)
    publish_tiny(connect(redis_url), settings)
    port = free_port()
    api = start_api(settings, port, tmp_path / "api.log")
    steps: list[int] = []  # the torch thread count of each optimiser step
    done = threading.Event()

    def train() -> None:
        model = torch.nn.Linear(64, 64)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with follow_load(api_busy(busy_dir(settings.home)), wide=2, narrow=1):
            while not done.is_set():
                model(torch.randn(32, 64)).sum().backward()
                opt.step()
                opt.zero_grad()
                steps.append(torch.get_num_threads())
                time.sleep(0.005)

    trainer = threading.Thread(target=train)
    try:
        wait_http(f"http://127.0.0.1:{port}")
        trainer.start()
        wait_for(lambda: len(steps) > 5, 30, what="training steps")
        assert steps[-1] == 2  # the API is up and idle: every core
        chatting = threading.Event()

        def chat() -> None:  # one streamed answer after another (a tiny model's answer can end within a step)
            body = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 64, "stream": True}
            headers = {"Authorization": "Bearer sk-test-alice"}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as http:
                while chatting.is_set():
                    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                        for _ in resp.iter_lines():
                            pass

        chatting.set()
        client = threading.Thread(target=chat)
        client.start()
        seen = len(steps)
        try:
            wait_for(lambda: 1 in steps[seen:], 60, interval=0.01, what="a step on the API's share")
        finally:
            chatting.clear()
            client.join(60)
        seen = len(steps)
        wait_for(lambda: steps[-1] == 2 and len(steps) > seen, 30, interval=0.01, what="every core again")
    finally:
        done.set()
        if trainer.is_alive():
            trainer.join(30)
        stop(api)


def test_up_starts_the_training_worker_at_low_priority_without_a_fixed_thread_count(tmp_path, monkeypatch):
    monkeypatch.delenv("ALIGND_TORCH_THREADS", raising=False)
    monkeypatch.delenv("ALIGND_SHARE_CORES", raising=False)
    out = tmp_path / "probe.txt"
    probe = [sys.executable, "-c", PROBE, str(out)]

    def seen(settings: Settings, name: str) -> str:
        spawn(settings, name, probe, {"ALIGND_TORCH_THREADS": "1"}).wait(30)
        return out.read_text()

    follow, split = Settings(device="cpu", home=tmp_path), Settings(device="cpu", home=tmp_path, share_cores="split")
    ours = os.nice(0)
    assert seen(follow, "worker-train") == f"{min(19, ours + TRAIN_NICE)} None PASSIVE"  # every core while idle
    assert seen(follow, "api") == f"{ours} 1 None"  # the API keeps its share and its priority
    assert seen(split, "worker-train") == f"{ours} 1 None"
