"""alignd/machine.py: CPU busy fraction from /proc/stat and latency percentiles, on real readings and files."""

from __future__ import annotations

import sys
import time

import pytest

from alignd.machine import CpuTimes, cpu_times, latency_summary, percentile


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_a_busy_loop_shows_as_busy_cpu_time():
    before = cpu_times()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 0.5:  # half a second of one core spinning
        pass
    spent = cpu_times() - before
    assert spent.busy > 0 and spent.total >= spent.busy and 0 < spent.fraction <= 1


def test_busy_is_everything_but_idle_and_iowait(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 10 50 800 40 0 5 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    assert cpu_times(stat) == CpuTimes(busy=165, total=1005)  # guest time is inside user already
    assert cpu_times(tmp_path / "missing") is None
    assert (CpuTimes(30, 40) + CpuTimes(10, 60)).fraction == 0.4 and CpuTimes(0, 0).fraction is None


def test_percentiles_are_nearest_rank_and_cycles_are_their_window():
    assert percentile([], 99) is None
    values = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    assert percentile(values, 99) == 0.099 and percentile(values, 50) == 0.05 and percentile([0.3], 99) == 0.3
    samples = [(t, 0.01) for t in range(10)] + [(t, 1.0) for t in (20, 21)]  # slow only in 20..22
    got = latency_summary(samples, windows=[(20, 22)])
    assert got["n"] == 12 and got["p50_ms"] == 10.0 and got["p99_ms"] == 1000.0
    assert got["during_cycles"] == {"n": 2, "p50_ms": 1000.0, "p95_ms": 1000.0, "p99_ms": 1000.0}
