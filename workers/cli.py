"""The online loop's commands, added to the `alignd` typer app by `register(app, train_app)`:

    alignd worker [--queues train,default] [--concurrency 1]   # a Celery worker (starts the embedded Redis if needed)
    alignd beat                                                # the scheduler: alignd.maybe_train every cycle
    alignd flower                                              # Flower on ALIGND_FLOWER_PORT with basic auth
    alignd train cycle [--json] [--enqueue]                    # one cycle now (here, or on a worker)
    alignd train reward [--data FILE] [--json]                 # retrain the reward model (all comparisons or FILE)
    alignd train ppo --steps N [--json]                        # PPO increments + gate + publish, no new feedback
    alignd versions [--json]                                   # versions with metrics, provenance, status
    alignd rollback VERSION                                    # make an earlier version current again

`children(exe)` gives `alignd up` the worker, beat and Flower commands.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from alignd.config import get_settings

console = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
CELERY = [sys.executable, "-m", "celery", "-A", "workers.celery_app"]


def children(exe: list[str]) -> dict[str, list[str]]:
    """Processes `alignd up` runs besides Redis and the API: a training worker (train queue, one cycle at a time),
    a light worker (default queue), beat and Flower."""
    return {
        "worker-train": [*exe, "worker", "--queues", "train", "--concurrency", "1", "--name", "train"],
        "worker": [*exe, "worker", "--queues", "default", "--pool", "solo", "--name", "default"],
        "beat": [*exe, "beat"],
        "flower": [*exe, "flower"],
    }


def _open_redis():
    from alignd.runtime import open_redis

    return open_redis(get_settings())


def _run_child(cmd: list[str], env: dict[str, str], embedded) -> None:
    """Run a Celery process in the foreground; SIGINT/SIGTERM go to it; the embedded Redis stops after it."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, _frame):
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = proc.wait()
    if embedded is not None:
        embedded.stop()
    raise typer.Exit(code)


def _celery_env(url: str) -> dict[str, str]:
    settings = get_settings()
    return {**os.environ, "ALIGND_REDIS_URL": url, "ALIGND_HOME": str(settings.home)}


def flower_credentials(home: Path) -> tuple[str, bool]:
    """'user:password' for Flower: FLOWER_BASIC_AUTH (Flower's own variable) or one generated under home
    (mode 0600); the flag says whether it was generated now."""
    configured = os.environ.get("FLOWER_BASIC_AUTH")
    if configured:
        return configured, False
    path = home / "flower.json"
    if path.exists():
        return json.loads(path.read_text())["basic_auth"], False
    cred = f"admin:{secrets.token_urlsafe(18)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"basic_auth": cred}, f)
    return cred, True


def _print(report: dict, as_json: bool, title: str) -> None:
    from workers.cycle import report_json

    if as_json:
        print(report_json(report))
        return
    console.print(f"[bold]{title}: {report.get('status', '')}")
    for k, v in report.items():
        if isinstance(v, (int, float, str)) or v is None:
            console.print(f"  {k}: {v}")
    for reason in report.get("reasons", []):
        console.print(f"  [yellow]gate: {reason}")


def register(app: typer.Typer, train_app: typer.Typer) -> None:
    @app.command()
    def worker(
        queues: Annotated[str, typer.Option(help="comma list of queues: train, default")] = "train,default",
        concurrency: Annotated[int, typer.Option(help="processes; keep 1 on a train worker")] = 1,
        pool: Annotated[str, typer.Option(help="prefork enforces time limits; solo for light queues")] = "prefork",
        name: Annotated[str, typer.Option(help="worker node name (…@host)")] = "alignd",
        loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
    ):
        """Run a Celery worker (the train queue runs one cycle at a time)."""
        url, _, embedded = _open_redis()
        cmd = [*CELERY, "worker", "-Q", queues, "--concurrency", str(concurrency), "--pool", pool,
               "-n", f"{name}@%h", "-l", loglevel]
        _run_child(cmd, _celery_env(url), embedded)

    @app.command()
    def beat(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info"):
        """Run Celery beat: checks for new feedback every ALIGND_CYCLE_SECONDS, watches arena win rates."""
        settings = get_settings()
        url, _, embedded = _open_redis()
        settings.home.mkdir(parents=True, exist_ok=True)
        cmd = [*CELERY, "beat", "-s", str(settings.home / "celerybeat-schedule"), "-l", loglevel]
        _run_child(cmd, _celery_env(url), embedded)

    @app.command()
    def flower(port: Annotated[Optional[int], typer.Option(help="port (default ALIGND_FLOWER_PORT)")] = None):
        """Run Flower (task monitor) with HTTP basic auth; credentials are generated and printed if unset."""
        settings = get_settings()
        url, _, embedded = _open_redis()
        cred, generated = flower_credentials(settings.home)
        port = port or settings.flower_port
        user, _, password = cred.partition(":")
        note = " (generated, kept in " + str(settings.home / "flower.json") + ")" if generated else ""
        console.print(f"[bold]Flower on http://{settings.host}:{port}  user {user!r} password {password!r}{note}")
        cmd = [*CELERY, "flower", f"--port={port}", f"--address={settings.host}"]
        # the credentials travel in Flower's own environment variable, not on a command line `ps` shows
        _run_child(cmd, {**_celery_env(url), "FLOWER_BASIC_AUTH": cred}, embedded)

    @train_app.command("cycle")
    def train_cycle_cmd(
        as_json: JsonOpt = False,
        enqueue: Annotated[bool, typer.Option(help="send it to the train queue instead of running it here")] = False,
        min_events: Annotated[int, typer.Option(help="skip unless this many new feedback events wait")] = 0,
        config: Annotated[Optional[str], typer.Option(help="CycleConfig overrides as JSON")] = None,
    ):
        """One training cycle now: new feedback → reward model → PPO → gate → publish."""
        overrides = json.loads(config) if config else None
        url, r, _ = _open_redis()
        if enqueue:
            import celery

            sender = celery.Celery(broker=url)
            result = sender.send_task("alignd.train_cycle", kwargs={"trigger": "cli", "min_events": min_events,
                                                                   "overrides": overrides}, queue="train")
            _print({"status": "enqueued", "task_id": result.id}, as_json, "cycle")
            return
        from store.lock import LockBusy
        from workers.cycle import CycleError, load_cycle_config, run_cycle

        settings = get_settings()
        settings.apply_torch_threads()
        try:
            report = run_cycle(r, settings, load_cycle_config(settings, overrides), trigger="cli",
                               min_events=min_events)
        except (LockBusy, CycleError) as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2)
        _print(report, as_json, "cycle")

    @train_app.command("reward")
    def train_reward_cmd(
        data: Annotated[Optional[Path], typer.Option(help="JSONL of comparison/rated dicts (default: all feedback)")]
        = None,
        as_json: JsonOpt = False,
        config: Annotated[Optional[str], typer.Option(help="CycleConfig overrides as JSON")] = None,
    ):
        """Retrain the reward model; it becomes current only if its held-out accuracy does not regress."""
        from store.lock import FencedLock, LockBusy
        from workers.cycle import CycleError, load_cycle_config, train_reward

        settings = get_settings()
        settings.apply_torch_threads()
        _, r, _ = _open_redis()
        cfg = load_cycle_config(settings, json.loads(config) if config else None)
        items = None
        if data is not None:
            lines = [json.loads(x) for x in data.read_text().splitlines() if x.strip()]
            items = ([x for x in lines if "chosen" in x], [x for x in lines if "response" in x])
        try:
            with FencedLock(r, "train", ttl_ms=int(cfg.lock_ttl_s * 1000)) as lock:
                report = train_reward(r, settings, cfg, lock, data=items)
        except (LockBusy, CycleError) as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2)
        _print(report, as_json, "reward model")

    @train_app.command("ppo")
    def train_ppo_cmd(
        steps: Annotated[int, typer.Option(help="PPO iterations")] = 4,
        as_json: JsonOpt = False,
        config: Annotated[Optional[str], typer.Option(help="CycleConfig overrides as JSON")] = None,
    ):
        """PPO increments from the current policy against the current reward model, gated, then published."""
        from store.lock import LockBusy
        from workers.cycle import CycleError, load_cycle_config, run_ppo

        settings = get_settings()
        settings.apply_torch_threads()
        _, r, _ = _open_redis()
        cfg = load_cycle_config(settings, {**(json.loads(config) if config else {}), "ppo_steps": steps,
                                           "ppo_seconds": float("inf")})
        try:
            report = run_ppo(r, settings, cfg)
        except (LockBusy, CycleError) as exc:
            console.print(f"[red]{exc}")
            raise typer.Exit(2)
        _print(report, as_json, "ppo")

    @app.command()
    def versions(as_json: JsonOpt = False):
        """Policy versions with metrics, provenance, status and live arena win rates."""
        from store import registry

        _, r, _ = _open_redis()
        listing = registry.describe(r)
        if as_json:
            print(json.dumps(listing, default=str))
            return
        table = Table(title=f"policy versions (current: v{listing['current']})")
        for col in ("version", "status", "source", "parent", "reward", "events", "annotators", "score", "kl",
                    "arena"):
            table.add_column(col)
        for v in listing["data"]:
            m = v.get("metrics") or {}
            live = v.get("live_win_rate")
            ann = v.get("annotators")
            table.add_row(str(v["version"]), v["status"], str(v.get("source")), str(v.get("parent")),
                          str(v.get("reward_version")), str((v.get("feedback") or {}).get("events", "")),
                          str(len(ann)) if isinstance(ann, (dict, list)) else "",
                          f"{m['score/mean']:.3f}" if isinstance(m.get("score/mean"), float) else "",
                          f"{m['kl_to_ref']:.3f}" if isinstance(m.get("kl_to_ref"), float) else "",
                          f"{live['win_rate']:.2f} ({live['votes']})" if live else "")
        console.print(table)

    @app.command()
    def rollback(version: Annotated[int, typer.Argument(help="the version to make current again")]):
        """Make an earlier version current again (registry compare-and-set, event "rollback")."""
        from store.registry import RegistryConflict
        from workers.cycle import rollback as do_rollback

        _, r, _ = _open_redis()
        try:
            out = do_rollback(r, version, reason="alignd rollback")
        except (KeyError, RegistryConflict) as exc:
            console.print(f"[red]{exc.args[0] if exc.args else exc}")
            raise typer.Exit(2)
        console.print(f"[green]version {out['current']} is current again (was {out['previous']})")


