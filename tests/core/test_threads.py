"""A thread's torch thread count sticks once set, whatever other threads set before its first op."""

from __future__ import annotations

import threading

import torch

from core.threads import set_thread_torch_threads


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
