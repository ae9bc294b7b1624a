"""What a demo run measures about the machine it runs on: how busy its CPUs were over a stretch of time, and the
latency percentiles of the simulated users' requests.

CPU time comes from the first line of /proc/stat (Linux; man 5 proc): jiffies spent in each state since boot, summed
over every CPU. A stretch's busy fraction is 1 - (idle + iowait) / total between two readings, so it counts every
process on the machine, the demo's and anyone else's: on a shared machine it is an upper bound of the demo's share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
IDLE_FIELDS = (3, 4)  # idle, iowait: the CPU had nothing to run
STATE_FIELDS = 8  # user nice system idle iowait irq softirq steal; guest time is already counted in user


@dataclass(frozen=True)
class CpuTimes:
    busy: int  # jiffies, all CPUs
    total: int

    def __sub__(self, earlier: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy - earlier.busy, self.total - earlier.total)

    def __add__(self, other: CpuTimes) -> CpuTimes:
        return CpuTimes(self.busy + other.busy, self.total + other.total)

    @property
    def fraction(self) -> float | None:
        """Busy share of the CPU time (None for an empty stretch)."""
        return self.busy / self.total if self.total > 0 else None


def cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """The machine's CPU time so far, or None where there is no /proc/stat (not Linux)."""
    try:
        first = path.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    values = [int(x) for x in first[1 : 1 + STATE_FIELDS]]
    idle = sum(values[i] for i in IDLE_FIELDS)
    return CpuTimes(sum(values) - idle, sum(values))


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest-rank method: a value that occurred (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_summary(samples: Sequence[tuple[float, float]], windows: Sequence[tuple[float, float]] = ()) -> dict:
    """p50 / p95 / p99 in milliseconds of (started at, seconds) samples, over all of them and over those that started
    inside one of `windows` ((start, end) on the same clock: the training cycles)."""

    def summary(xs: list[float]) -> dict:
        return {"n": len(xs)} | {f"p{q}_ms": _ms(percentile(xs, q)) for q in (50, 95, 99)}

    inside = [s for t, s in samples if any(a <= t < b for a, b in windows)]
    return summary([s for _, s in samples]) | {"during_cycles": summary(inside)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 1)
