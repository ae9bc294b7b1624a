"""A thread's torch thread count sticks once set, whatever other threads set before its first op; two training
stages beside each other share the cores; `two_at_once` runs tasks two at a time on half the threads each."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from core.threads import _CORES, beside, follow_load, rebalance, set_thread_torch_threads, two_at_once


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


def test_two_at_once_runs_tasks_two_at_a_time_on_half_the_threads_each():
    running, most, lock = [0], [0], threading.Lock()
    both = threading.Barrier(2, timeout=10)  # the first two tasks only end once both have started

    def task(name: str, wait: bool):
        def run():
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            if wait:
                both.wait()
            time.sleep(0.05)
            n = torch.get_num_threads()
            torch.ones(64, 64) @ torch.ones(64, 64)
            with lock:
                running[0] -= 1
            return name, n, threading.current_thread().name

        return run

    before = torch.get_num_threads()
    try:
        set_thread_torch_threads(4)
        done = two_at_once({"a": task("a", True), "b": task("b", True), "c": task("c", False)})
        assert torch.get_num_threads() == 4  # the caller's own count is left alone
    finally:
        torch.set_num_threads(before)
    assert list(done) == ["a", "b", "c"] and [v[0] for v in done.values()] == ["a", "b", "c"]
    assert most[0] == 2 and done["a"][1] == done["b"][1] == 2  # the two at once: half the caller's 4 each
    assert done["c"][1] in (2, 4)  # the last: 4 if the other thread had already ended when it started
    assert len({thread for _, _, thread in done.values()}) == 2


def test_the_last_task_widens_at_its_next_rebalance_once_the_other_has_ended():
    other_ended = threading.Event()
    seen: list[int] = []

    recorded = threading.Event()

    def short():
        recorded.wait(10)  # ends once the long task has seen its half
        return "short"

    def long():
        seen.append(torch.get_num_threads())
        recorded.set()
        while len(_CORES.counts) > 1:  # the short task's thread still counts
            time.sleep(0.01)
        other_ended.set()
        rebalance()
        seen.append(torch.get_num_threads())
        torch.ones(64, 64) @ torch.ones(64, 64)
        return "long"

    before = torch.get_num_threads()
    try:
        set_thread_torch_threads(2)
        done = two_at_once({"long": long, "short": short})
    finally:
        torch.set_num_threads(before)
    assert done == {"long": "long", "short": "short"} and other_ended.is_set()
    assert seen == [1, 2]


def test_a_training_thread_that_waits_for_two_at_once_gives_its_share_and_takes_it_back():
    seen: list[int] = []
    busy = [False]
    with follow_load(lambda: busy[0], 2, 1) as counts:
        both = threading.Barrier(2, timeout=10)
        count = lambda: (both.wait(), torch.get_num_threads())[1]  # noqa: E731 (neither has ended yet)
        done = two_at_once({"a": count, "b": count})
        busy[0] = True
        _steps(1, seen)  # the caller's optimiser steps still follow the load: its step hook is back
    assert done == {"a": 1, "b": 1}  # follow_load's 2, shared
    assert seen == [1] and counts == [2, 1]  # the same list follow_load yielded, still kept


def test_two_at_once_raises_the_first_error_after_every_task_ended():
    ended: list[str] = []

    def fails():
        raise ValueError("first failed")

    def slow():
        time.sleep(0.2)
        ended.append("slow")
        return 1

    with pytest.raises(ValueError, match="first failed"):
        two_at_once({"fails": fails, "slow": slow, "after": lambda: ended.append("after")})
    assert sorted(ended) == ["after", "slow"]
