"""Setting torch's CPU thread count for the calling thread only, so that it sticks; and a training thread's count
that follows the API's load on a shared machine.

torch's OpenMP backend keeps the count per thread, but reads it lazily: a thread's first parallel op copies the
process-wide count (the value of the most recent `torch.set_num_threads` on *any* thread) over its own. So a thread
that sets 2 and then waits for work runs on whatever another thread set meanwhile — the API's engine thread set 2,
the registry follower then set 1 for its own loads, and every decode step ran on one thread (`bench/serve.py
--server-threads 2` measured the 1-thread engine). Touching the count first makes the thread's copy its own.

Sharing one machine (`alignd up`, `alignd demo`; core/config.py `share_cores`): each API process marks itself busy
with a file under ALIGND_HOME/run/busy while its engine has sequences in flight (`BusyFlag`), and a training cycle
runs each optimiser step on every core while no such mark is fresh, on its share while one is (`follow_load`).
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

# The training worker's priority under `share_cores=follow`: at 19 the kernel weighs a nice-0 thread 68 times as
# heavily (CFS weights 1024 and 15), so a request that arrives inside a training step gets its core at once.
TRAIN_NICE = 19
BUSY_REFRESH_S = 1.0  # a busy API process rewrites its mark this often …
BUSY_STALE_S = 5.0  # … and a mark older than this is a process that died busy: ignored


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


@contextlib.contextmanager
def follow_load(busy: Callable[[], bool], wide: int, narrow: int) -> Iterator[list[int]]:
    """Within the block, the calling thread runs on `wide` torch threads, and on `narrow` while `busy()`: checked
    before every optimiser step the thread takes (a global torch.optim step hook, so the trainers in training/ need
    not know). Yields the list of counts set so far (for tests and reports); restores `narrow` on leaving."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    owner, counts = threading.get_ident(), []

    def choose() -> None:
        n = narrow if busy() else wide
        if not counts or counts[-1] != n:
            counts.append(set_thread_torch_threads(n))

    def hook(optimizer, args, kwargs) -> None:
        if threading.get_ident() == owner:  # another thread's optimiser (a test, a second worker thread) keeps its own
            choose()

    choose()
    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()
        set_thread_torch_threads(narrow)
