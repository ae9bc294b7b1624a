"""A thread's torch thread count sticks once set, whatever other threads set before its first op; two training
stages beside each other share the cores."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from core.threads import beside, follow_load, set_thread_torch_threads


def _count_after_another_thread_sets_one(setter) -> int:
    """`setter(2)` on a thread that then waits while another thread sets 1 and runs an op; the count the first
    thread's own first op runs with."""
    seen: list[int] = []
    set_done, other_done = threading.Event(), threading.Event()

    def first() -> None:
        setter(2)
        set_done.set()
        other_done.wait(10)
        torch.ones(64, 64) @ torch.ones(64, 64)
        seen.append(torch.get_num_threads())

    def other() -> None:
        set_done.wait(10)
        torch.set_num_threads(1)
        torch.ones(8) + 1
        other_done.set()

    before = torch.get_num_threads()
    try:
        threads = [threading.Thread(target=first), threading.Thread(target=other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        torch.set_num_threads(before)
    return seen[0]


def test_a_threads_count_survives_another_thread_setting_its_own():
    assert _count_after_another_thread_sets_one(set_thread_torch_threads) == 2


def test_plain_set_num_threads_is_overwritten_by_a_later_setter_on_another_thread():
    """Why the helper exists: torch reads the process-wide count into a thread at its first op. Should torch ever
    stop doing so, this test fails and the helper can go."""
    assert _count_after_another_thread_sets_one(torch.set_num_threads) == 1


def _steps(n: int, seen: list[int], before_each=None) -> list[int]:
    """`n` optimiser steps of a small model, recording the thread's torch count at each."""
    model = torch.nn.Linear(128, 128)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(n):
        if before_each is not None:
            before_each()
        model(torch.randn(32, 128)).sum().backward()
        opt.step()
        opt.zero_grad()
        seen.append(torch.get_num_threads())
    return seen


def _side(main_seen: list[int], n: int = 5):
    """A side stage of `n` steps that ends only once the main stage has taken three (both ran at once)."""

    def run() -> list[int]:
        seen = _steps(n, [])
        deadline = time.monotonic() + 30
        while len(main_seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        return seen

    return run


def test_two_stages_beside_each_other_share_the_cores_and_the_survivor_widens():
    before = torch.get_num_threads()
    main_seen: list[int] = []
    try:
        set_thread_torch_threads(2)
        side, main = beside(_side(main_seen), lambda: _steps(200, main_seen, before_each=lambda: time.sleep(0.001)))
        assert side == [1] * 5 and main[:3] == [1, 1, 1]  # one core each while both train …
        assert main[-1] == 2  # … and the main stage takes both back once the side one ended
        assert torch.get_num_threads() == 2  # the caller's own count afterwards
    finally:
        torch.set_num_threads(before)


def test_beside_shares_follow_loads_count_and_gives_it_back():
    seen: list[int] = []
    with follow_load(lambda: False, wide=2, narrow=1) as counts:
        side, _ = beside(_side(seen, 3), lambda: _steps(3, seen))
        _steps(2, seen)  # after the side stage: every core again
    assert side == [1, 1, 1] and seen[:3] == [1, 1, 1] and seen[-1] == 2 and counts[0] == 2
    assert torch.get_num_threads() == 1  # follow_load leaves the narrow count


def test_beside_raises_the_side_stages_error_once_the_main_stage_has_ended():
    ended: list[str] = []

    def side():
        raise RuntimeError("side failed")

    def main():
        _steps(3, [])
        ended.append("main")
        return "main result"

    with pytest.raises(RuntimeError, match="side failed"):
        beside(side, main)
    assert ended == ["main"]
    seen: list[int] = []
    other = threading.Thread(target=lambda: (set_thread_torch_threads(2), _steps(2, seen)))
    other.start()
    other.join(30)
    assert seen == [2, 2]  # no step hook left behind: another thread's optimiser keeps its own count
