"""The one-command demo: from an empty data directory to an aligned model and a report, through the real service.

It starts what `alignd up` runs — embedded Redis, the SFT bootstrap, the API, the Celery training and light
workers, beat and Flower — as separate processes, lets a pool of simulated users (alignd/simulate.py) chat and give
feedback over HTTP, and triggers training cycles through the real path (POST /admin/train → Celery `train` queue →
reward model → PPO → gate → publish → every API process hot-swaps). It watches each published version come into
service (the X-Policy-Version of the users' answers), then stops everything and builds the alignment report
(alignd/report.py) with a before/after table. Nothing is mocked: the numbers are what the loop achieved.

    alignd demo                                   # 15 minutes, balanced/brevity/detail/strict annotators
    alignd demo --minutes 5 --cycles 3 --json
    alignd demo --compare-pools brevity detail    # whose values? two runs, two pools, one comparison
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from alignd.machine import CpuTimes, cpu_times, latency_summary
from alignd.report import ReportConfig, build_report, verdict
from alignd.simulate import BackgroundSimulation, SimConfig, api_keys_setting, sim_api_keys, simulated_users
from core.config import Settings, get_settings
from core.redis_server import EmbeddedRedis, free_port
from store import keys, registry
from store.client import connect
from store.feedback import unconsumed_count

CYCLE_MARGIN = 1.3  # a cycle takes longer than the last one: the reward model retrains on all comparisons
MIN_STRETCH_S = 10.0  # spare seconds worth giving to the last cycle's update
Log = Callable[[str], None]


@dataclass
class DemoConfig:
    minutes: float = 15.0  # wall-clock budget of the whole demo, bootstrap and report included
    annotators: str = "balanced,brevity,detail,strict"  # simulated pool (training.annotators styles)
    users: int = 8  # simulated users (two of each style by default)
    noise: float = 0.25  # annotator label noise (AlpacaFarm's estimate of human disagreement)
    cycles: int = 3  # training cycles to complete at least (the demo overruns its budget rather than do fewer)
    home: Path | None = None  # empty data directory (default: a new temporary one)
    out: Path | None = None  # report directory (default: home/report)
    sft_seconds: float = 120.0  # bootstrap SFT budget (docs/benchmarks.md: what SFT reaches)
    base: Path | None = None  # register this HF causal-LM folder as version 1 instead of the SFT bootstrap
    rate: float = 4.0  # chat requests per second from all users: leaves CPU to the trainer on 2 cores
    concurrency: int = 8  # simulated requests in flight at once
    first_feedback: int = 300  # events before the first cycle: the reward model needs a few hundred comparisons
    min_feedback: int = 100  # new events before each later cycle
    threads: int | None = None  # torch threads per service process (default: `alignd up`'s, ALIGND_SHARE_CORES)
    cycle_config: dict[str, Any] = field(default_factory=dict)  # CycleConfig overrides (ALIGND_HOME/cycle.json)
    graders_as_reward: bool = False  # the labelled second run (README): the built-in world's graders on training
    #                                  prompts (held-out family left out) join the policy update; off by default, so
    #                                  the headline figures come from the simulated people's feedback alone
    report: ReportConfig = field(default_factory=ReportConfig)
    report_reserve_s: float = 60.0  # kept at the end for the report's evaluation of every version (~25 s measured)
    startup_timeout_s: float = 300.0  # API and workers ready (model load, Celery start)
    cycle_timeout_s: float = 1500.0  # a cycle taking longer than the worker's hard time limit is lost
    seed: int = 0  # the simulated people's draws (questions, votes, noise); give each run of a comparison its own


class Services:
    """The processes of one demo run: Redis (ours), bootstrap, then `alignd up` (API, workers, beat, Flower)."""

    def __init__(self, cfg: DemoConfig, home: Path, log: Log):
        self.cfg, self.home, self.log = cfg, home, log
        self.logs = home / "logs"
        self.redis = EmbeddedRedis(home / "redis")
        self.users = simulated_users(cfg.users, cfg.annotators, cfg.noise)
        self.user_keys = sim_api_keys(self.users)
        self.admin_key = f"sk-admin-{secrets.token_urlsafe(12)}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.up: subprocess.Popen | None = None
        self.redis_url: str | None = None

    def env(self, threads: int | None) -> dict[str, str]:
        env = dict(os.environ)  # the operator's other ALIGND_* settings (device, limits …) still apply
        env.update(
            {
                "ALIGND_HOME": str(self.home),
                "ALIGND_REDIS_URL": self.redis_url,
                "ALIGND_API_KEYS": api_keys_setting(self.user_keys),
                "ALIGND_ADMIN_KEY": self.admin_key,
                "ALIGND_PORT": str(self.port),
                "ALIGND_FLOWER_PORT": str(free_port()),
                # the demo triggers cycles itself; beat's periodic check stays out of the way
                "ALIGND_CYCLE_SECONDS": "3600",
                "ALIGND_MIN_NEW_FEEDBACK": str(self.cfg.min_feedback),
                "ALIGND_POLL_SECONDS": "0.5",
                "ALIGND_GC_KEEP": "0",  # every version stays on disk: the report re-scores each one
            }
        )
        if threads:
            env["ALIGND_TORCH_THREADS"] = str(threads)
        return env

    def start_redis(self):
        self.redis_url = self.redis.start()
        return connect(self.redis_url)

    def bootstrap(self) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "alignd.cli", "bootstrap", "--seconds", str(self.cfg.sft_seconds), "--json"]
        if self.cfg.base is not None:
            cmd += ["--base", str(Path(self.cfg.base).resolve())]
        with open(self.logs / "bootstrap.log", "ab") as err:
            done = subprocess.run(cmd, env=self.env(None), stdout=subprocess.PIPE, stderr=err, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"bootstrap failed (exit {done.returncode}); see {self.logs / 'bootstrap.log'}")
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    def start_up(self) -> None:
        # the API and the trainer share the cores as `alignd up` shares them (ALIGND_SHARE_CORES), unless told a count
        threads = self.cfg.threads or get_settings().torch_threads
        cmd = [sys.executable, "-m", "alignd.cli", "up", "--port", str(self.port)]
        self.up = subprocess.Popen(
            cmd,
            env=self.env(threads),
            stdout=open(self.logs / "up.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, r) -> None:
        """The API answers /readyz and a Celery worker consumes the train queue."""
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if self.up is not None and self.up.poll() is not None:
                raise RuntimeError(f"`alignd up` exited with {self.up.returncode}; see {self.logs / 'up.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200 and self._worker_ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"alignd did not become ready in {self.cfg.startup_timeout_s:.0f} s; see {self.logs}")

    def _worker_ready(self) -> bool:
        import celery

        app = celery.Celery(broker=self.redis_url, broker_transport_options=keys.celery_transport_options())
        try:
            replies = app.control.ping(timeout=1.0) or []
        finally:
            app.close()
        return any(name.startswith("train@") for reply in replies for name in reply)

    def admin(self, method: str, path: str, **kw) -> httpx.Response:
        return httpx.request(
            method, f"{self.url}{path}", headers={"Authorization": f"Bearer {self.admin_key}"}, timeout=30, **kw
        )

    def stop_up(self) -> None:
        if self.up is not None and self.up.poll() is None:
            os.killpg(self.up.pid, signal.SIGTERM)  # `up` stops its children, then exits
            try:
                self.up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.up.pid, signal.SIGKILL)
                self.up.wait()
        self.up = None

    def stop(self) -> None:
        self.stop_up()
        self.redis.stop()


def _cycle_result(r, task_id: str) -> dict[str, Any] | None:
    """The finished cycle's report (workers/tasks.py stores it under the task id), or its recorded failure."""
    raw = r.get(keys.task_result(task_id))
    if raw:
        return json.loads(raw)
    failed = registry.find_events(r, 1000, event="cycle_failed", task=task_id)
    return {"status": "error", "reason": failed[0].get("reason")} if failed else None


def _wait_swap(r, sim: BackgroundSimulation, version: int, timeout: float) -> float | None:
    """Seconds from `version`'s publish event to the first answer a simulated user got from it (None if no answer
    came from it within `timeout`): the hot-swap as users see it."""
    published = registry.find_events(r, 1000, event="published", version=version)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        seen = sim.counts()["first_seen"].get(str(version))
        if seen is not None:
            return max(0.0, seen - published[0]["at"]) if published else None
        time.sleep(0.2)
    return None


def cycle_cpu(cycles: list[dict[str, Any]]) -> float | None:
    """The machine's busy fraction over all cycles together (CPU time summed, so a long cycle weighs more)."""
    measured = [CpuTimes(c["cpu"]["busy"], c["cpu"]["total"]) for c in cycles if c.get("cpu")]
    return sum(measured, CpuTimes(0, 0)).fraction if measured else None


def _terminate(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def stretch_overrides(remaining: float, last_cycle_s: float, n_done: int, cfg: DemoConfig) -> dict[str, Any]:
    """CycleConfig overrides for the cycle about to start. When it is the last one the budget has room for (counted
    as the loop counts, each cycle CYCLE_MARGIN times the previous), its update gets the spare seconds that would
    otherwise go unused, as `update.stretch` (PPO, DPO and KTO alike): more training on the most feedback."""
    if last_cycle_s <= 0 or n_done + 1 < cfg.cycles:
        return {}
    this = CYCLE_MARGIN * last_cycle_s
    if remaining - this >= CYCLE_MARGIN * this:  # another cycle will fit after this one
        return {}
    spare = (remaining - this) / CYCLE_MARGIN
    if spare < MIN_STRETCH_S:
        return {}
    seconds = update_seconds(cfg.cycle_config)
    return {"update.stretch": round((seconds + spare) / seconds, 3)}


def update_seconds(cycle_config: dict[str, Any]) -> float:
    """The wall-clock budget of the run's policy update: update.seconds for PPO, else DPO's or KTO's max_seconds."""
    from workers.cycle_config import CycleConfig

    cc = CycleConfig.from_dict(cycle_config)
    if cc.update.algorithm == "ppo":
        return cc.update.seconds
    return getattr(cc, cc.update.algorithm).max_seconds or cc.update.seconds


GRADER_SUITE = "graders-train.jsonl"  # written into the data directory with graders_as_reward
GRADERS_AS_REWARD = {  # graders_as_reward's cycle settings; the run's own cycle_config keys win
    "reward.grader_weight": 1.0,
    "update.grader_prompt_share": 0.25,
    "eval.suites": [GRADER_SUITE],
}


def with_graders(cfg: DemoConfig) -> DemoConfig:
    """`cfg` with graders_as_reward's cycle settings merged under its own (a no-op when the option is off)."""
    if not cfg.graders_as_reward:
        return cfg
    return replace(cfg, cycle_config={**GRADERS_AS_REWARD, **cfg.cycle_config})


def _prepare_home(cfg: DemoConfig) -> tuple[Path, Path]:
    """The (empty) data directory with the run's cycle.json (and grader suite), and the report directory."""
    home = Path(cfg.home) if cfg.home else Path(tempfile.mkdtemp(prefix="alignd-demo-"))
    home = home.expanduser().resolve()
    if home.exists() and any(home.iterdir()):
        raise ValueError(f"{home} is not empty: the demo starts from an empty data directory (pass a new --home)")
    if cfg.graders_as_reward:
        from training.graders import world_suite_items

        home.mkdir(parents=True, exist_ok=True)
        items = world_suite_items(40, seed=cfg.seed, split="train")
        (home / GRADER_SUITE).write_text("".join(json.dumps(x) + "\n" for x in items))
    if cfg.cycle_config:
        from workers.cycle_config import CycleConfig

        CycleConfig.from_dict(cfg.cycle_config)  # a bad key fails now, not in the first cycle minutes later
    (home / "logs").mkdir(parents=True, exist_ok=True)
    if cfg.cycle_config:
        (home / "cycle.json").write_text(json.dumps(cfg.cycle_config))
    return home, Path(cfg.out) if cfg.out else home / "report"


def _start(
    services: Services, cfg: DemoConfig, budget: float, say: Log, summary: dict[str, Any], elapsed: Callable[[], float]
):
    """Redis, version 1 (bootstrap or --base), `alignd up`, the simulated users; returns (redis, simulation)."""
    r = services.start_redis()
    say(f"data directory {services.home}; Redis {services.redis_url}")
    say(
        f"registering {cfg.base} as version 1"
        if cfg.base
        else f"bootstrapping the SFT assistant ({cfg.sft_seconds:.0f} s of SFT)"
    )
    boot = services.bootstrap()
    summary["bootstrap"] = {"version": boot.get("version"), "eval": boot.get("eval"), "seconds": round(elapsed(), 1)}
    say(
        f"policy v{boot.get('version')} ({boot.get('source', 'sft')}) registered; starting API, workers, beat "
        "and Flower"
    )
    services.start_up()
    services.wait_ready(r)
    say(f"alignd is up on {services.url}; {cfg.users} simulated users ({cfg.annotators}) start chatting")
    sim = BackgroundSimulation(
        SimConfig(
            url=services.url,
            users=cfg.users,
            seconds=10 * budget,
            annotators=cfg.annotators,
            noise=cfg.noise,
            rate=cfg.rate,
            concurrency=cfg.concurrency,
            seed=cfg.seed,
        ),
        services.user_keys,
        admin_key=services.admin_key,  # re-serves the overlap items that annotator reliability is estimated from
    ).start()
    return r, sim


def _one_cycle(
    r,
    services: Services,
    sim: BackgroundSimulation,
    cfg: DemoConfig,
    need: int,
    overrides: dict[str, Any],
    n: int,
    say: Log,
) -> dict[str, Any]:
    """POST /admin/train, wait for the task's result, then (when published) for the users to see the version."""
    cpu_before = cpu_times()
    resp = services.admin("POST", "/admin/train", json={"min_events": need, "overrides": overrides or None})
    resp.raise_for_status()
    task_id, started = resp.json()["task_id"], time.monotonic()
    result = None
    while result is None:
        if time.monotonic() - started > cfg.cycle_timeout_s:
            result = {"status": "timeout", "reason": f"no result after {cfg.cycle_timeout_s:.0f} s"}
            break
        time.sleep(1.0)
        result = _cycle_result(r, task_id)
    ended = time.monotonic()
    seconds = ended - started
    cpu_after = cpu_times()
    cpu = cpu_after - cpu_before if cpu_before and cpu_after else None
    record = {
        "task_id": task_id,
        "status": result.get("status"),
        "seconds": round(seconds, 1),
        "overrides": overrides,
        "events": (result.get("feedback") or {}).get("events"),
        "version": result.get("version"),
        "reasons": result.get("reasons"),
        "reason": result.get("reason"),
        "reward_heldout_accuracy": ((result.get("reward") or {}).get("metrics") or {}).get("heldout_accuracy"),
        "gate": result.get("gate"),
        # which update ran on what: people's new and replayed items, and the graders' (graders_as_reward)
        "update": {k: (result.get("update") or {}).get(k) for k in ("algorithm", "data")},
        # the whole machine over the cycle (alignd/machine.py): what training leaves idle while the users chat
        "window": [started, ended],
        "cpu": None if cpu is None else {"busy": cpu.busy, "total": cpu.total, "busy_fraction": cpu.fraction},
    }
    if record["status"] == "published":
        record["swap_seconds"] = swap = _wait_swap(r, sim, record["version"], 120.0)
        busy = f" (cores {cpu.fraction:.0%} busy)" if cpu is not None and cpu.fraction is not None else ""
        say(
            f"cycle {n}: v{record['version']} published in {seconds:.0f} s{busy}; served "
            + (f"{swap:.1f} s after publishing" if swap is not None else "NOT seen by the users")
        )
    else:
        say(f"cycle {n}: {record['status']} after {seconds:.0f} s {record['reasons'] or record['reason'] or ''}")
    return record


def _cycles(
    r,
    services: Services,
    sim: BackgroundSimulation,
    cfg: DemoConfig,
    budget: float,
    say: Log,
    elapsed: Callable[[], float],
) -> list[dict[str, Any]]:
    """Train whenever enough feedback waits, until the cycles asked for are done and the next would not fit."""
    cycles: list[dict[str, Any]] = []
    deadline = budget - cfg.report_reserve_s
    hard_deadline = 3 * budget  # fewer cycles than asked for: overrun, but not forever
    last_cycle_s = 0.0
    while True:
        done = [c for c in cycles if c["status"] in ("published", "gate_failed")]
        remaining = deadline - elapsed()
        if len(done) >= cfg.cycles and remaining < max(CYCLE_MARGIN * last_cycle_s, 1.0):
            return cycles
        if elapsed() > hard_deadline:
            say(f"[red]stopping: {len(done)} of {cfg.cycles} cycles after {elapsed():.0f} s")
            return cycles
        need = cfg.first_feedback if not done else cfg.min_feedback
        waiting = unconsumed_count(r)
        if waiting < need:
            if sim.error is not None or not sim.thread.is_alive():
                raise RuntimeError(f"the simulated users stopped: {sim.error!r}")
            time.sleep(1.0)
            continue
        overrides = stretch_overrides(remaining, last_cycle_s, len(done), cfg)
        say(
            f"{waiting} new feedback events ({sim.counts()['feedback']}); POST /admin/train"
            + (f" (last cycle: the update gets the spare time, x{overrides['update.stretch']})" if overrides else "")
        )
        record = _one_cycle(r, services, sim, cfg, need, overrides, len(cycles) + 1, say)
        last_cycle_s = record["seconds"]
        cycles.append(record)
        if sum(c["status"] in ("error", "timeout", "abandoned") for c in cycles) >= 2:
            raise RuntimeError(f"training cycles keep failing: {record}; see {services.logs}")


def run_demo(
    cfg: DemoConfig,
    log: Log = lambda msg: print(msg, file=sys.stderr),
    *,
    run_label: str | None = None,
    compare: dict | None = None,
) -> dict[str, Any]:
    """One demo run; returns a summary (with the report's JSON under "report")."""
    cfg = with_graders(cfg)
    t0 = time.monotonic()
    budget = cfg.minutes * 60
    home, out = _prepare_home(cfg)
    elapsed = lambda: time.monotonic() - t0  # noqa: E731
    say = lambda msg: log(f"[{elapsed():6.0f}s] {msg}")  # noqa: E731
    services = Services(cfg, home, say)
    sim: BackgroundSimulation | None = None
    cycles: list[dict[str, Any]] = []
    latencies: list[tuple[float, float]] = []
    summary: dict[str, Any] = {
        "home": str(home),
        "report_dir": str(out),
        "annotators": cfg.annotators,
        "users": cfg.users,
        "noise": cfg.noise,
        "minutes_budget": cfg.minutes,
        "graders_as_reward": cfg.graders_as_reward,
        "seed": cfg.seed,  # the simulated people's draws: runs with different seeds are different samples
    }
    # a SIGTERM (kill, a CI timeout) must stop the services as Ctrl-C does, not orphan them
    restore = (
        signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        r, sim = _start(services, cfg, budget, say, summary, elapsed)
        cycles = _cycles(r, services, sim, cfg, budget, say, elapsed)
        summary["simulation"] = sim.stop()
        latencies = list(sim.sim.latencies)
        sim = None
        say(
            f"simulated users stopped: {summary['simulation']['requests']} requests, "
            f"{summary['simulation']['feedback']['total']} feedback events; stopping the services"
        )
        summary["serving"] = services.admin("GET", "/admin/versions").json().get("serving")
        services.stop_up()  # the report needs only Redis and the checkpoints; give it the CPU
        say("building the report (every version re-scored on one evaluation set)")
        report = build_report(
            r,
            out,
            cfg.report,
            run={
                "annotators": run_label or cfg.annotators,
                "users": cfg.users,
                "noise": cfg.noise,
                "minutes": cfg.minutes,
                "home": str(home),
            },
            compare=compare,
            settings=Settings(home=home),
        )
    finally:
        if sim is not None:
            try:
                sim.stop(timeout=30)
            except Exception:  # the services are going down anyway; the original error matters more
                pass
        services.stop()
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)
    summary.update(
        cpu_busy_during_cycles=cycle_cpu(cycles),
        serving_latency=latency_summary(latencies, [c["window"] for c in cycles]),
        cycles=cycles,
        seconds=round(elapsed(), 1),
        within_budget=elapsed() <= budget,
        swaps_seen=sum(1 for c in cycles if c.get("swap_seconds") is not None),
        published=sum(1 for c in cycles if c["status"] == "published"),
        report=report,
    )
    (out / "demo.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "report"}, indent=2, default=str)
    )
    return summary


def run_compare(cfg: DemoConfig, pools: tuple[str, str], log: Log) -> dict[str, Any]:
    """Whose values? The same demo twice, with two annotator pools; the second report compares against the first."""
    base = Path(cfg.home) if cfg.home else Path(tempfile.mkdtemp(prefix="alignd-compare-"))
    runs = []
    for pool in pools:
        sub = DemoConfig(
            **{
                **cfg.__dict__,
                "annotators": pool,
                "home": base / pool.replace(",", "+"),
                "out": (Path(cfg.out) / pool.replace(",", "+")) if cfg.out else None,
            }
        )
        log(f"=== pool {pool} ===")
        runs.append(run_demo(sub, log, run_label=pool, compare=runs[0]["report"] if runs else None))
    return {"pools": list(pools), "runs": runs, "compare": runs[-1]["report"].get("compare")}


# ------------------------------------------------------------------------------------------------ printing

TABLE_ROWS = (
    ("score/mean", "checker score, trained families"),
    ("heldout_score", "held-out family score"),
    ("over_caution", "over-caution (benign refused)"),
    ("harmful_compliance", "harmful compliance"),
    ("jailbreak_compliance", "… under jailbreaks"),
    ("length_mean", "mean length (tokens)"),
    ("words_mean", "mean length (words)"),
    ("kl_to_ref", "KL to SFT (nats)"),
    ("reward_heldout_accuracy", "reward model held-out accuracy"),
    ("oracle_utility", "oracle utility"),
)


def print_tables(summary: dict[str, Any], console) -> None:
    from rich.table import Table

    rep = summary["report"]
    ba = rep["before_after"]
    rows = {row["version"]: row for row in rep["versions"]}
    base_source = rows[rep["baseline_version"]].get("source") or "reference"
    table = Table(
        title=f"before (v{rep['baseline_version']}, {base_source}) / after (v{rep['final_version']}) — "
        f"{summary['annotators']} annotators, {summary['seconds']:.0f} s"
    )
    for col in ("metric", "before", "after", "change"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for key, name in TABLE_ROWS:
        b, a = ba.get(key, {}).get("before"), ba.get(key, {}).get("after")
        if key == "words_mean":
            b, a = rows[rep["baseline_version"]].get(key), rows[rep["final_version"]].get(key)
        table.add_row(name, fmt(b), fmt(a), "–" if a is None or b is None else f"{a - b:+.3f}")
    console.print(table)
    console.print(f"  measured on: {rows[rep['final_version']].get('measured_on')}")
    oracle = rep.get("oracle") or {}
    if "win_rate" in oracle:
        final, baseline = oracle["final"], oracle["baseline"]
        console.print(
            f"the noise-free oracle {verdict(oracle, final, baseline)} on {oracle['n']} prompts "
            f"({oracle.get('decoding')})"
        )
        if oracle.get("greedy"):
            console.print(f"  on greedy responses it {verdict(oracle['greedy'], final, baseline)}")
    for w in rep.get("warnings", []):
        console.print(f"[yellow]warning: {w}")
    for name, t in rep["targets"].items():
        mark = {True: "[green]met", False: "[red]not met", None: "[yellow]n/a"}[t["met"]]
        console.print(f"  target {name}: {mark}[/] ({json.dumps({k: v for k, v in t.items() if k != 'met'})})")
    busy, latency = summary.get("cpu_busy_during_cycles"), summary.get("serving_latency") or {}
    console.print(
        "machine: "
        + ("CPU busy –" if busy is None else f"CPU {busy:.0%} busy")
        + f" during the cycles; users' chat p99 {latency.get('p99_ms')} ms over the run, "
        f"{(latency.get('during_cycles') or {}).get('p99_ms')} ms during cycles"
    )
    console.print(
        f"cycles: {len(summary['cycles'])} run, {summary['published']} published, "
        f"{summary['swaps_seen']} seen in service; report: {summary['report_dir']}/report.html"
    )
    cmp = rep.get("compare")
    if cmp:
        t = Table(title="whose values? final versions of two annotator pools")
        t.add_column("metric")
        t.add_column(cmp["other"]["label"], justify="right")
        t.add_column(cmp["this"]["label"], justify="right")
        for k in cmp["this"]["final"]:
            t.add_row(k, fmt(cmp["other"]["final"][k]), fmt(cmp["this"]["final"][k]))
        console.print(t)


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    """The demo's JSON on stdout: the run, its cycles, before/after, oracle and targets (the report has the rest)."""
    rep = summary["report"]
    return {
        **{k: v for k, v in summary.items() if k != "report"},
        "final_version": rep["final_version"],
        "baseline_version": rep["baseline_version"],
        "before_after": rep["before_after"],
        "oracle": rep["oracle"],
        "targets": rep["targets"],
        "report_cycles": rep["cycles"],
        "compare": rep.get("compare"),
    }
