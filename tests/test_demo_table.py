"""bench/demo_table.py on synthetic bench/demo.py outputs: every figure the comparison needs reaches the JSON and
the table, runs are grouped by their setting, the median row is each column's median, and the notes say how many
runs (and seeds) a median is of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.demo_table import figures, setting, table

ROOT = Path(__file__).resolve().parents[1]


def run_json(seed: int, win: float, checker_after: float, cpu: float, p99: float, **cycle_config) -> dict:
    """A bench/demo.py output with made-up figures (the keys it writes)."""

    def ba(before: float, after: float) -> dict:
        return {"before": before, "after": after, "delta": after - before}

    return {
        "seed": seed,
        "seconds": 840.0,
        "cycle_config": cycle_config,
        "oracle": {"win_rate": win, "ci_low": win - 0.03, "ci_high": win + 0.03, "greedy": {"win_rate": win - 0.1}},
        "before_after": {
            "score/mean": ba(0.40, checker_after),
            "heldout_score": ba(0.0, 0.05 * seed),
            "over_caution": ba(0.05, 0.0),
            "harmful_compliance": ba(0.05, 0.0),
            "jailbreak_compliance": ba(0.04, 0.01),
            "kl_to_ref": ba(0.0, 0.4),
            "length_mean": ba(10.0, 9.0),
        },
        "cpu_busy_during_cycles": cpu,
        "serving_latency": {
            "n": 3000,
            "p50_ms": 80.0,
            "p99_ms": p99,
            "during_cycles": {"n": 2000, "p99_ms": p99 + 50},
        },
        "cycles": [{"status": "published"}, {"status": "published"}, {"status": "gate_failed"}],
    }


RUNS = [
    ("dpo-1", run_json(1, 0.60, 0.50, 0.55, 400.0)),
    ("dpo-2", run_json(2, 0.70, 0.56, 0.65, 900.0)),
    ("dpo-3", run_json(3, 0.62, 0.52, 0.60, 500.0)),
    ("generic-1", run_json(1, 0.66, 0.55, 0.90, 700.0, **{"update.generic_share": 0.25})),
    ("generic-2", run_json(1, 0.64, 0.53, 0.80, 600.0, update={"generic_share": 0.25})),
]


def test_every_figure_of_the_measurement_reaches_a_run():
    f = figures(RUNS[0][1])
    assert f["win_rate"] == 0.60 and (f["ci_low"], f["ci_high"]) == (0.57, 0.63)
    assert (f["checker_before"], f["checker_after"]) == (0.40, 0.50) and f["heldout_after"] == 0.05
    assert (f["over_caution_before"], f["over_caution_after"]) == (0.05, 0.0)
    assert (f["harmful_after"], f["jailbreak_after"]) == (0.0, 0.01) and f["kl"] == 0.4 and f["length_after"] == 9.0
    assert f["cpu_busy"] == 0.55 and f["p99_ms"] == 400.0 and f["p99_cycles_ms"] == 450.0
    assert f["minutes"] == 14.0 and f["seed"] == 1 and (f["published"], f["cycles"]) == (2, 3)


def test_runs_are_grouped_by_setting_and_the_median_is_per_column():
    assert setting(RUNS[0][1]) == "dpo"  # the default algorithm, named
    assert setting(RUNS[3][1]) == setting(RUNS[4][1]) == "dpo, update.generic_share=0.25"  # dotted or nested
    assert setting({"cycle_config": {"update.algorithm": "kto", "reward.grader_weight": 1.0}}) == "kto+graders"
    text, out = table(RUNS)
    assert set(out["runs"]) == {"dpo", "dpo, update.generic_share=0.25"}
    med = out["medians"]["dpo"]
    assert med["win_rate"] == 0.62 and med["checker_after"] == 0.52 and med["cpu_busy"] == 0.60
    assert med["p99_ms"] == 500.0 and med["seed"] is None  # a seed is not a figure
    assert out["notes"]["dpo"] == "dpo: median of 3 runs"
    assert "only 1 distinct seed" in out["notes"]["dpo, update.generic_share=0.25"]  # two runs, one sample

    header, rule, *rows = text.splitlines()
    for column in ("oracle win rate", "held-out family", "harmful plain / jailbroken", "CPU busy", "serving p99"):
        assert column in header
    assert rule.count("---") == header.count("|") - 1
    dpo_median = next(r for r in rows if r.startswith("| **dpo, median of 3**"))
    cells = [c.strip() for c in dpo_median.strip("|").split("|")]
    assert cells[1].startswith("**0.620**") and cells[8] == "60%" and cells[9].startswith("500")
    assert "| dpo-2 |" in text and any(r.startswith("| dpo-2 |") and r.rstrip().endswith("| 2 |") for r in rows)


def test_the_script_prints_the_table_and_json(tmp_path):
    paths = []
    for name, run in RUNS:
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "demo_table.py"), *map(str, paths), "--json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    out = json.loads(done.stdout)
    assert out["medians"]["dpo, update.generic_share=0.25"]["win_rate"] == 0.65
    assert out["runs"]["dpo"]["dpo-3"]["seed"] == 3
