"""Setting torch's CPU thread count for the calling thread only, so that it sticks; and a training thread's count
that follows the API's load on a shared machine.

torch's OpenMP backend keeps the count per thread, but reads it lazily: a thread's first parallel op copies the
process-wide count (the value of the most recent `torch.set_num_threads` on *any* thread) over its own. So a thread
that sets 2 and then waits for work runs on whatever another thread set meanwhile — the API's engine thread set 2,
the registry follower then set 1 for its own loads, and every decode step ran on one thread (`bench/serve.py
--server-threads 2` measured the 1-thread engine). Touching the count first makes the thread's copy its own.

Sharing one machine (`alignd up`, `alignd demo`; core/config.py `share_cores`): each API process marks itself busy
with a file under ALIGND_HOME/run/busy while its engine has sequences in flight (`BusyFlag`), and a training cycle
runs each optimiser step on every core while no such mark is fresh, on its share while one is (`follow_load`);
two stages that train at once (`beside`: the reward model beside a DPO/KTO update) split that count between them.
The count is only changed between steps (one thread's OpenMP team cannot change size inside a parallel region), so
the training worker also runs at a lower priority (`TRAIN_NICE`): within a step the kernel hands the API's threads
the core they want. `python bench/share_cores.py` compares this with a fixed split.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

# The training worker's priority under `share_cores=follow`: at 19 the kernel weighs a nice-0 thread 68 times as
# heavily (CFS weights 1024 and 15), so a request that arrives inside a training step gets its core at once.
TRAIN_NICE = 19
BUSY_REFRESH_S = 1.0  # a busy API process rewrites its mark this often …
BUSY_STALE_S = 5.0  # … and a mark older than this is a process that died busy: ignored

T = TypeVar("T")
U = TypeVar("U")


def set_thread_torch_threads(n: int) -> int:
    """Run this thread's torch ops on `n` threads from now on, whatever other threads set later. Returns `n`."""
    import torch

    torch.get_num_threads()  # the lazy per-thread initialisation happens here, before our own value is set
    torch.set_num_threads(n)
    return n


def busy_dir(home: Path) -> Path:
    """Where the API processes of the home ALIGND_HOME mark themselves busy (one file each)."""
    return home / "run" / "busy"


class BusyFlag:
    """One API process's mark: a file that exists while its engine has sequences in flight. `set` is called by the
    engine's scheduler thread at each of its loop turns; it touches the file system only when the state changes,
    or every BUSY_REFRESH_S while busy (so a mark left by a killed process goes stale)."""

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / str(os.getpid())
        self._busy, self._written = False, 0.0
        self.path.unlink(missing_ok=True)

    def set(self, busy: bool) -> None:
        now = time.monotonic()
        if busy and (not self._busy or now - self._written > BUSY_REFRESH_S):
            self.path.touch()
            self._written = now
        elif not busy and self._busy:
            self.path.unlink(missing_ok=True)
        self._busy = busy

    def clear(self) -> None:
        self.set(False)


def api_busy(directory: Path) -> Callable[[], bool]:
    """True while any API process marks itself busy in `directory` (a listdir and a stat per mark: ~20 µs)."""

    def busy() -> bool:
        try:
            marks = list(os.scandir(directory))
        except FileNotFoundError:
            return False
        now = time.time()
        for mark in marks:
            try:
                if now - mark.stat().st_mtime < BUSY_STALE_S:
                    return True
            except FileNotFoundError:  # removed between the listing and the stat: that process went idle
                continue
        return False

    return busy


class _Cores:
    """The torch threads each training thread of this process may use now: the cores the process has (follow_load's
    `wide`, or `narrow` while the API is busy; else the count `beside` found) shared by the threads that train at
    once. Each thread applies its count itself, before each of its optimiser steps (a global torch.optim step
    hook: the trainers in training/ need not know), since a thread's count can only be set on that thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.follow: tuple[Callable[[], bool], int, int] | None = None  # follow_load's (busy, wide, narrow)
        self.fixed = 1  # the cores without follow_load: the count of the thread that opened `beside`
        self.counts: dict[int, list[int]] = {}  # training thread -> the counts it set, in order
        self.hook = None

    def target(self) -> int:
        if self.follow is not None:
            busy, wide, narrow = self.follow
            cores = narrow if busy() else wide
        else:
            cores = self.fixed
        return max(1, cores // max(1, len(self.counts)))

    def choose(self) -> None:
        """Set the calling thread's count to its share now (a no-op on a thread that does not train)."""
        counts = self.counts.get(threading.get_ident())
        if counts is None:
            return
        n = self.target()
        if not counts or counts[-1] != n:
            counts.append(set_thread_torch_threads(n))

    def join(self, counts: list[int] | None = None) -> list[int]:
        """Count the calling thread among the training threads (installing the step hook with the first)."""
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        with self.lock:
            counts = self.counts.setdefault(threading.get_ident(), [] if counts is None else counts)
            if self.hook is None:
                self.hook = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: self.choose())
        self.choose()
        return counts

    def step_aside(self) -> list[int] | None:
        """Stop counting the calling thread while it waits for others (its counts are kept for `step_back`)."""
        with self.lock:
            return self.counts.pop(threading.get_ident(), None)

    def step_back(self, counts: list[int] | None) -> None:
        if counts is not None:
            self.join(counts)

    def leave(self) -> None:
        with self.lock:
            self.counts.pop(threading.get_ident(), None)
            if not self.counts and self.hook is not None:
                self.hook.remove()
                self.hook = None


_CORES = _Cores()


@contextlib.contextmanager
def follow_load(busy: Callable[[], bool], wide: int, narrow: int) -> Iterator[list[int]]:
    """Within the block, the calling thread runs on `wide` torch threads, and on `narrow` while `busy()`: checked
    before every optimiser step the thread takes; threads training `beside` it share the count. Yields the list of
    counts set so far (for tests and reports); restores `narrow` on leaving."""
    _CORES.follow = (busy, wide, narrow)
    try:
        counts = _CORES.join()
        try:
            yield counts
        finally:
            _CORES.leave()
    finally:
        _CORES.follow = None
        set_thread_torch_threads(narrow)


def beside(side: Callable[[], T], main: Callable[[], U]) -> tuple[T, U]:
    """`side()` on a second thread while this one runs `main()`: two independent training stages at once, each on
    its share of the cores, rechecked before each optimiser step, so the one still running widens once the other
    has ended. Why: a small model's training step is mostly Python on one thread, and two of them at once keep both
    cores of a 2-core machine busy (a second thread's Python runs while the first's kernels hold no GIL; two tiny-
    model training loops on one thread each finished in 0.84x the time of one after the other on two). Returns
    both results once both have ended; the first exception (main's, else side's) is raised after both ended."""
    outcome: dict[str, object] = {}
    before = torch_threads()
    if _CORES.follow is None:
        _CORES.fixed = before

    def run_side() -> None:
        _CORES.join()
        started.set()
        try:
            outcome["value"] = side()
        except BaseException as exc:  # re-raised on the calling thread
            outcome["error"] = exc
        finally:
            _CORES.leave()

    joined = threading.get_ident() not in _CORES.counts
    if joined:
        _CORES.join()
    started = threading.Event()
    thread = threading.Thread(target=run_side, name="beside", daemon=True)
    thread.start()
    try:
        started.wait()
        _CORES.choose()  # this thread's share from now, not from its next optimiser step
        result = main()
    finally:
        thread.join()
        if joined:
            _CORES.leave()
            set_thread_torch_threads(before)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"], result  # type: ignore[return-value]


def two_at_once(tasks: dict[str, Callable[[], T]]) -> dict[str, T]:
    """Each of `tasks` on one of two threads, the next starting as soon as a thread is free. The two share the
    calling thread's cores (or follow_load's) as `beside`'s stages do; a task widens to every core once the other
    thread has nothing left, at its next `rebalance()` (training/evaluate.py calls it between generation batches).
    Why: evaluating a small model is batched generation, mostly Python on one thread, so one evaluation alone leaves
    a second core idle (the gate evaluates three policies, workers/gate_stage.py). The caller only waits meanwhile,
    so its own share goes to the two. Tasks set their own per-thread state (grad mode, autocast). Returns the
    results by name once all have ended; the first exception, in `tasks` order, is raised then."""
    from concurrent.futures import ThreadPoolExecutor

    if _CORES.follow is None:
        _CORES.fixed = torch_threads()
    aside = _CORES.step_aside()
    counted = threading.Barrier(min(2, len(tasks)) or 1, timeout=60)

    def run(task: Callable[[], T], first: bool) -> T:
        _CORES.join()
        try:
            if first:  # the first two start on their halves, not the one that joined first on every core
                counted.wait()
                _CORES.choose()
            return task()
        finally:
            _CORES.leave()

    try:
        with ThreadPoolExecutor(2, thread_name_prefix="beside") as pool:
            futures = {name: pool.submit(run, task, i < 2) for i, (name, task) in enumerate(tasks.items())}
    finally:
        _CORES.step_back(aside)
    return {name: future.result() for name, future in futures.items()}


def rebalance() -> None:
    """Take the calling thread's current share of the cores if it is one of the threads working at once (`beside`,
    `two_at_once`), between two units of its work; a no-op on any other thread."""
    _CORES.choose()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()
