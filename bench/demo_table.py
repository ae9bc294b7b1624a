"""Several `bench/demo.py` runs side by side: one markdown row per run and the median per algorithm, plus JSON.

Each cycle algorithm is judged on the median of three demo runs, by the checker score as well as the win rate:

    for alg in ppo dpo kto; do for n in 1 2 3; do
      python bench/demo.py --cycle-config "{\\"update.algorithm\\": \\"$alg\\"}" > runs/$alg-$n.json
    done; done
    python bench/demo_table.py runs/*.json

The algorithm of a run is read from its JSON (the cycle config it ran with; today's default where none was
given; "+graders" for runs with graders as reward). The median row
takes each column's median separately, so it is not one run's figures. The JSON (stdout after the table, or only
the JSON with --json) has every run's figures and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".")
    return cfg.get(dotted, (cfg.get(section) or {}).get(key))


def algorithm(run: dict[str, Any]) -> str:
    """The run's group: its update algorithm (today's default where its config names none), "+graders" when graders
    were part of the reward (bench/demo.py --graders-as-reward), "+onpolicy N@W" with DPO's judged pairs (N prompts
    a cycle at weight W, update.onpolicy_*; a group per setting, so settings are compared by their medians)."""
    from workers.cycle_config import UpdateConfig

    cfg, default = run.get("cycle_config") or {}, UpdateConfig()
    name = _get(cfg, "update.algorithm") or default.algorithm
    name += "+graders" if (_get(cfg, "reward.grader_weight") or 0) > 0 else ""
    pairs = _get(cfg, "update.onpolicy_pairs") or default.onpolicy_pairs
    weight = _get(cfg, "update.onpolicy_weight")
    weight = default.onpolicy_weight if weight is None else weight
    return name + (f"+onpolicy {pairs}@{weight:g}" if name.startswith("dpo") and pairs > 0 and weight > 0 else "")


def figures(run: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers of one run (None where the run did not measure them)."""
    ba, oracle = run["before_after"], run.get("oracle") or {}

    def before(k: str) -> Any:
        return (ba.get(k) or {}).get("before")

    def after(k: str) -> Any:
        return (ba.get(k) or {}).get("after")

    cycles = run.get("cycles") or []
    return {
        "win_rate": oracle.get("win_rate"),
        "ci_low": oracle.get("ci_low"),
        "ci_high": oracle.get("ci_high"),
        "greedy_win_rate": (oracle.get("greedy") or {}).get("win_rate"),
        "checker_before": before("score/mean"),
        "checker_after": after("score/mean"),
        "checker_gain": (ba.get("score/mean") or {}).get("delta"),
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
        "cycles": len(cycles),
        "published": sum(c.get("status") == "published" for c in cycles),
        "minutes": run["seconds"] / 60 if run.get("seconds") is not None else None,
    }


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for k in rows[0]:
        values = [row[k] for row in rows if isinstance(row[k], (int, float))]
        out[k] = statistics.median(values) if values else None
    return out


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(groups: dict[str, list[tuple[str, dict[str, Any]]]], medians: dict[str, dict[str, Any]]) -> str:
    head = (
        "| run | oracle win rate vs SFT [95 % CI] | checker score, trained families | held-out family | "
        "over-caution | harmful plain / jailbroken | KL (nats) | length (tokens) | published / cycles | minutes |"
    )
    lines = [head, "|" + "---|" * 10]

    def row(name: str, f: dict[str, Any], bold: bool = False) -> str:
        b = "**" if bold else ""
        gain = f["checker_gain"]
        cells = [
            f"{b}{name}{b}",
            f"{b}{_f(f['win_rate'])}{b}"
            + ("" if f["ci_low"] is None else f" [{_f(f['ci_low'])}, {_f(f['ci_high'])}]"),
            f"{_f(f['checker_before'])} → {b}{_f(f['checker_after'])}{b}"
            + ("" if gain is None else f" ({gain:+.3f})"),
            _f(f["heldout_after"]),
            f"{_f(f['over_caution_before'])} → {_f(f['over_caution_after'])}",
            f"{_f(f['harmful_before'])} / {_f(f['jailbreak_before'])} → "
            f"{_f(f['harmful_after'])} / {_f(f['jailbreak_after'])}",
            _f(f["kl"], 2),
            f"{_f(f['length_before'], 1)} → {_f(f['length_after'], 1)}",
            "–" if f["published"] is None else f"{f['published']:.0f} / {f['cycles']:.0f}",
            _f(f["minutes"], 1),
        ]
        return "| " + " | ".join(cells) + " |"

    for alg, runs in groups.items():
        lines += [row(name, f) for name, f in runs]
        lines.append(row(f"{alg}, median of {len(runs)}", medians[alg], bold=True))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench/demo.py JSON outputs")
    ap.add_argument("--json", action="store_true", help="print only the JSON")
    args = ap.parse_args()
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path in args.runs:
        run = json.loads(path.read_text())
        groups.setdefault(algorithm(run), []).append((path.stem, figures(run)))
    medians = {alg: median([f for _, f in runs]) for alg, runs in groups.items()}
    out = {"runs": {alg: dict(runs) for alg, runs in groups.items()}, "medians": medians}
    if not args.json:
        print(markdown(groups, medians), end="\n\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
