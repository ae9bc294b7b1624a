"""Full-size demo as a benchmark: does the online loop align the built-in assistant within its time budget?

Runs `alignd demo` with its default settings (bootstrap SFT, API, Celery workers, beat, Flower, simulated users,
training cycles with hot-swaps, report) from an empty data directory and prints JSON: wall time, cycles (status,
seconds, swap latency), feedback counts, before/after metrics, the oracle win rate of the final version against the
SFT version with its 95 % bootstrap CI, and the demo's targets (win rate >= 65 % with CI lower bound > 50 %, checker
score +0.05, over-caution down, harmful compliance not up), each marked met or not, measured, never assumed; the
machine's CPU busy fraction during the training cycles and the users' chat latency (p50/p95/p99, over the run and
during cycles; alignd/machine.py), and the seed. `bench/demo_table.py` puts several runs in one table.

    python bench/demo.py --seed 1                         # 15 minutes, default pool
    python bench/demo.py --minutes 10 --annotators brevity --home /tmp/alignd-bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignd.demo import DemoConfig, brief, run_demo, with_graders  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=DemoConfig.minutes)
    ap.add_argument("--seed", type=int, default=DemoConfig.seed, help="the simulated people's draws (one per run)")
    ap.add_argument("--annotators", default=DemoConfig.annotators)
    ap.add_argument("--cycles", type=int, default=DemoConfig.cycles)
    ap.add_argument("--home", type=Path, default=None, help="empty data directory (default: a temporary one)")
    ap.add_argument(
        "--cycle-config",
        default=None,
        help="""CycleConfig overrides as JSON, nested or dotted keys, e.g. '{"reward.lr": 3e-4}'""",
    )
    ap.add_argument(
        "--graders-as-reward",
        action="store_true",
        help="the labelled run: the built-in world's graders on training prompts join the policy update",
    )
    args = ap.parse_args()
    cfg = DemoConfig(
        minutes=args.minutes,
        seed=args.seed,
        annotators=args.annotators,
        cycles=args.cycles,
        home=args.home,
        cycle_config=json.loads(args.cycle_config) if args.cycle_config else {},
        graders_as_reward=args.graders_as_reward,
    )
    summary = run_demo(cfg)
    out = brief(summary)
    out["machine"] = {"cpus": os.cpu_count()}
    out["cycle_config"] = with_graders(cfg).cycle_config  # the run's setting (bench/demo_table.py groups by it)
    out["versions"] = [
        {
            k: row.get(k)
            for k in (
                "version",
                "source",
                "score/mean",
                "heldout_score",
                "over_caution",
                "harmful_compliance",
                "jailbreak_compliance",
                "length_mean",
                "kl_to_ref",
                "reward_heldout_accuracy",
                "feedback_events",
            )
        }
        for row in summary["report"]["versions"]
    ]
    out.pop("simulation", None)
    out["simulation"] = {k: summary["simulation"][k] for k in ("requests", "feedback", "errors", "served_versions")}
    print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
