"""Several `bench/demo.py` runs side by side: one markdown row per run and the median per setting, plus JSON.

Each setting is judged on the median of three demo runs with different seeds, by the checker score as well as the
win rate:

    for n in 1 2 3; do
      python bench/demo.py --seed $n > runs/dpo-$n.json
      python bench/demo.py --seed $n --cycle-config '{"update.generic_share": 0.25}' > runs/generic-$n.json
    done
    python bench/demo_table.py runs/*.json

A run's setting is read from its JSON: the update algorithm (today's default where its cycle config names none),
"+graders" for runs with graders as reward, then every other cycle-config key it ran with. Runs of one setting with
the same seed are the same sample drawn twice, and the table says so. The median row takes each column's median
separately, so it is not one run's figures. Columns: the oracle's win rate of the final version against the SFT
start with its 95 % CI, the checker score of the trained families and of the held-out one, over-caution, harmful
compliance plain / jailbroken, KL to SFT, length, the machine's CPU busy fraction during the training cycles, the
simulated users' p99 chat latency over the run, cycles, minutes and the seed. The JSON (stdout after the table, or
only the JSON with --json) has every run's figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRADER_KEYS = ("reward.grader_weight", "update.grader_prompt_share", "eval.suites")  # named by "+graders"
NOT_MEDIAN = ("seed",)  # a label of the run, not a figure


def setting(run: dict[str, Any]) -> str:
    """The run's group: its update algorithm (today's default where its config names none), "+graders" when graders
    were part of the reward (bench/demo.py --graders-as-reward), then its other cycle-config keys, sorted."""
    from workers.cycle_config import UpdateConfig, flatten

    cfg = flatten(run.get("cycle_config") or {})
    name = cfg.get("update.algorithm") or UpdateConfig().algorithm
    name += "+graders" if (cfg.get("reward.grader_weight") or 0) > 0 else ""
    rest = [f"{k}={json.dumps(v)}" for k, v in sorted(cfg.items()) if k != "update.algorithm" and k not in GRADER_KEYS]
    return ", ".join([name, *rest])


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers of one run (None where the run did not measure them)."""
    ba, oracle = run["before_after"], run.get("oracle") or {}

    def before(k: str) -> Any:
        return (ba.get(k) or {}).get("before")

    def after(k: str) -> Any:
        return (ba.get(k) or {}).get("after")

    cycles = run.get("cycles") or []
    latency = run.get("serving_latency") or {}
    return {
        "win_rate": oracle.get("win_rate"),
        "ci_low": oracle.get("ci_low"),
        "ci_high": oracle.get("ci_high"),
        "greedy_win_rate": (oracle.get("greedy") or {}).get("win_rate"),
        "checker_before": before("score/mean"),
        "checker_after": after("score/mean"),
        "checker_gain": (ba.get("score/mean") or {}).get("delta"),
        "heldout_before": before("heldout_score"),
        "heldout_after": after("heldout_score"),
        "over_caution_before": before("over_caution"),
        "over_caution_after": after("over_caution"),
        "harmful_before": before("harmful_compliance"),
        "harmful_after": after("harmful_compliance"),
        "jailbreak_before": before("jailbreak_compliance"),
        "jailbreak_after": after("jailbreak_compliance"),
        "kl": after("kl_to_ref"),
        "length_before": before("length_mean"),
        "length_after": after("length_mean"),
        "cpu_busy": run.get("cpu_busy_during_cycles"),
        "p99_ms": latency.get("p99_ms"),
        "p99_cycles_ms": (latency.get("during_cycles") or {}).get("p99_ms"),
        "cycles": len(cycles),
        "published": sum(c.get("status") == "published" for c in cycles),
        "minutes": run["seconds"] / 60 if run.get("seconds") is not None else None,
        "seed": run.get("seed"),
    }


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for k in rows[0]:
        values = [row[k] for row in rows if isinstance(row[k], (int, float)) and not isinstance(row[k], bool)]
        out[k] = statistics.median(values) if values and k not in NOT_MEDIAN else None
    return out


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


HEAD = (
    "run",
    "oracle win rate vs SFT [95 % CI]",
    "checker score, trained families",
    "held-out family",
    "over-caution",
    "harmful plain / jailbroken",
    "KL (nats)",
    "length (tokens)",
    "CPU busy in cycles",
    "serving p99 (ms)",
    "published / cycles",
    "minutes",
    "seed",
)


def _row(name: str, f: dict[str, Any], bold: bool = False) -> str:
    b = "**" if bold else ""
    gain = f["checker_gain"]
    cells = [
        f"{b}{name}{b}",
        f"{b}{_f(f['win_rate'])}{b}" + ("" if f["ci_low"] is None else f" [{_f(f['ci_low'])}, {_f(f['ci_high'])}]"),
        f"{_f(f['checker_before'])} → {b}{_f(f['checker_after'])}{b}" + ("" if gain is None else f" ({gain:+.3f})"),
        f"{_f(f['heldout_before'])} → {_f(f['heldout_after'])}",
        f"{_f(f['over_caution_before'])} → {_f(f['over_caution_after'])}",
        f"{_f(f['harmful_before'])} / {_f(f['jailbreak_before'])} → "
        f"{_f(f['harmful_after'])} / {_f(f['jailbreak_after'])}",
        _f(f["kl"], 2),
        f"{_f(f['length_before'], 1)} → {_f(f['length_after'], 1)}",
        "–" if f["cpu_busy"] is None else f"{f['cpu_busy']:.0%}",
        _f(f["p99_ms"], 0) + ("" if f["p99_cycles_ms"] is None else f" ({_f(f['p99_cycles_ms'], 0)} in cycles)"),
        "–" if f["published"] is None else f"{f['published']:.0f} / {f['cycles']:.0f}",
        _f(f["minutes"], 1),
        "–" if f["seed"] is None else str(f["seed"]),
    ]
    return "| " + " | ".join(cells) + " |"


def note(name: str, runs: list[tuple[str, dict[str, Any]]]) -> str:
    """How many runs a setting's median is of, and how many distinct seeds they had."""
    seeds = [f["seed"] for _, f in runs]
    distinct = len(set(seeds))
    text = f"{name}: median of {len(runs)} run{'s' * (len(runs) != 1)}"
    if distinct < len(runs):
        text += f", only {distinct} distinct seed{'s' * (distinct != 1)} (runs with one seed are one sample)"
    return text


def markdown(groups: dict[str, list[tuple[str, dict[str, Any]]]], medians: dict[str, dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for name, runs in groups.items():
        lines += [_row(run, f) for run, f in runs]
        lines.append(_row(f"{name}, median of {len(runs)}", medians[name], bold=True))
    lines.append("")
    lines += [f"- {note(name, runs)}" for name, runs in groups.items()]
    lines.append(
        "- CPU busy: the whole machine during the training cycles (/proc/stat); serving p99: the simulated users' "
        "chat requests over the run (in brackets: those sent during cycles)"
    )
    return "\n".join(lines)


def table(runs: list[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """(markdown, JSON) of named bench/demo.py outputs."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, run in runs:
        groups.setdefault(setting(run), []).append((name, figures(run)))
    medians = {name: median([f for _, f in rows]) for name, rows in groups.items()}
    out = {
        "runs": {name: dict(rows) for name, rows in groups.items()},
        "medians": medians,
        "notes": {name: note(name, rows) for name, rows in groups.items()},
    }
    return markdown(groups, medians), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench/demo.py JSON outputs")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args()
    text, out = table([(path.stem, json.loads(path.read_text())) for path in args.runs])
    if not args.json:
        print(text, end="\n\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
