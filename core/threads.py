"""Setting torch's CPU thread count for the calling thread only, so that it sticks.

torch's OpenMP backend keeps the count per thread, but reads it lazily: a thread's first parallel op copies the
process-wide count (the value of the most recent `torch.set_num_threads` on *any* thread) over its own. So a thread
that sets 2 and then waits for work runs on whatever another thread set meanwhile — the API's engine thread set 2,
the registry follower then set 1 for its own loads, and every decode step ran on one thread (`bench/serve.py
--server-threads 2` measured the 1-thread engine). Touching the count first makes the thread's copy its own.
"""

from __future__ import annotations


def set_thread_torch_threads(n: int) -> int:
    """Run this thread's torch ops on `n` threads from now on, whatever other threads set later. Returns `n`."""
    import torch

    torch.get_num_threads()  # the lazy per-thread initialisation happens here, before our own value is set
    torch.set_num_threads(n)
    return n
