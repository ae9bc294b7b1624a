"""The `alignd` command line (typer). Every command takes its configuration from `ALIGND_*` variables.

    alignd up                     # everything: embedded Redis, bootstrap on first start, API, worker, beat, Flower
    alignd bootstrap --json       # train the built-in assistant (SFT) and register it as policy version 1
    alignd serve --port 8000      # the API alone
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from alignd.config import get_settings
from workers.cli import children as worker_children, register as register_worker_commands

app = typer.Typer(help="alignd: online alignment of a served chat model.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Run one training step synchronously (SFT, reward model, PPO, a full cycle).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


def _redis(settings):
    from alignd.runtime import open_redis

    return open_redis(settings)


def _print_eval(title: str, evaluation: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in evaluation.items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(table)


@app.command()
def bootstrap(
    seconds: Annotated[float, typer.Option(help="SFT wall-clock budget")] = 180.0,
    base: Annotated[Optional[Path], typer.Option(help="register this local HF causal-LM folder instead")] = None,
    force: Annotated[bool, typer.Option(help="publish a new SFT version even if one exists")] = False,
    eval_per_family: Annotated[int, typer.Option(help="held-out evaluation prompts per task family")] = 20,
    as_json: JsonOpt = False,
):
    """Build the SFT assistant (or register --base) as the first policy version and print its checker scores."""
    from tqdm import tqdm

    from alignd.runtime import publish_version
    from store import registry

    settings = get_settings()
    settings.apply_torch_threads()
    _, r, _ = _redis(settings)
    current = registry.current_version(r)
    if current is not None and not force:
        meta = registry.get_version(r, current)
        report = {"version": current, "already_bootstrapped": True, "eval": meta.get("metrics", {})}
        if as_json:
            print(json.dumps(report))
        else:
            console.print(f"already bootstrapped: policy version {current} is current (use --force to redo)")
        return
    if base is not None:
        from training.model import load_causal_lm

        try:
            load_causal_lm(base)  # refuses folders without a chat template
        except Exception as exc:
            console.print(f"[red]cannot use {base}: {exc}")
            raise typer.Exit(2)
        save = lambda d: shutil.copytree(base, d, dirs_exist_ok=True)  # noqa: E731
        report = {"source": "base", "base": str(base)}
        meta = {"source": "base", "base": str(base), "parent": None, "metrics": {}}
    else:
        from training.bootstrap import BootstrapConfig, bootstrap as run_bootstrap
        from training.evaluate import EvalConfig
        from training.sft import SFTConfig

        cfg = BootstrapConfig(sft=SFTConfig(max_seconds=seconds), eval=EvalConfig(n_per_family=eval_per_family))
        bar = tqdm(total=int(seconds), desc="SFT", unit="s", disable=as_json)

        def progress(step: int, m: dict) -> None:
            bar.n = min(int(m["seconds"]), bar.total)
            bar.set_postfix(step=step, loss=f"{m['loss']:.3f}")
            bar.refresh()

        model, tok, report = run_bootstrap(cfg, progress)
        bar.close()
        save = lambda d: (model.save_pretrained(d), tok.save_pretrained(d))  # noqa: E731
        meta = {"source": "sft", "parent": None, "reward_version": None, "feedback": {"events": 0},
                "annotators": ["built-in demonstrations"], "metrics": report["eval"], "sft": report["sft"]}
    version = publish_version(r, settings, save, meta, expected_current=current if force else None)
    report["version"] = version
    if as_json:
        print(json.dumps(report))
    else:
        if "eval" in report:
            _print_eval(f"policy v{version}: held-out checker scores", report["eval"])
        console.print(f"[green]policy version {version} is current")


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="bind address (default ALIGND_HOST)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default ALIGND_PORT)")] = None,
):
    """Run the API: OpenAI-compatible chat, feedback, admin, metrics."""
    import uvicorn

    from service.app import create_app
    from service.engine import Engine
    from service.loader import load_version
    from store import registry

    settings = get_settings()
    settings.apply_torch_threads(serving=True)
    url, r, _ = _redis(settings)
    version = registry.current_version(r)
    if version is None:
        console.print("[red]no policy version is registered: run `alignd bootstrap` (or `alignd up`) first")
        raise typer.Exit(2)
    # The engine thread must get the GIL back as soon as a torch op returns; with the default 5 ms switch interval
    # the event loop's threads hold it for whole intervals and single-stream decoding runs ~2x slower (bench/serve.py).
    sys.setswitchinterval(0.0005)
    policy = load_version(r, settings, version)
    engine = Engine(policy, max_batch_size=settings.max_batch_size)
    application = create_app(settings, url, engine)
    keyring = application.state.alignd.keyring
    if keyring.generated:
        console.print(f"[bold]generated API keys (kept in {settings.home / 'keys.json'}):")
        for key, user in keyring.users.items():
            console.print(f"  user {user}: {key}")
        console.print(f"  admin: {keyring.admin_key}")
    console.print(f"serving policy v{version} on http://{host or settings.host}:{port or settings.port}")
    uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_level="info")


@app.command()
def keys(as_json: JsonOpt = False):
    """Print the API keys (configured or generated under ALIGND_HOME)."""
    from service.auth import load_keyring

    kr = load_keyring(get_settings())
    if as_json:
        print(json.dumps({"users": kr.users, "admin_key": kr.admin_key}))
    else:
        for key, user in kr.users.items():
            print(f"user {user}: {key}")
        print(f"admin: {kr.admin_key}")


def _child_env(settings, redis_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["ALIGND_REDIS_URL"] = redis_url
    env["ALIGND_HOME"] = str(settings.home)
    return env


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="API port (default ALIGND_PORT)")] = None,
    seconds: Annotated[float, typer.Option(help="SFT budget if bootstrapping")] = 180.0,
):
    """Run everything: embedded Redis (unless ALIGND_REDIS_URL), bootstrap on first start, API, worker, beat,
    Flower. Ctrl-C stops them all."""
    from store import registry

    settings = get_settings()
    url, r, embedded = _redis(settings)
    env = _child_env(settings, url)
    exe = [sys.executable, "-m", "alignd.cli"]
    if registry.current_version(r) is None:
        console.print("first start: bootstrapping the SFT assistant")
        subprocess.run([*exe, "bootstrap", "--seconds", str(seconds)], env=env, check=True)
    children = {"api": [*exe, "serve", "--port", str(port or settings.port)]}
    children.update(worker_children(exe))  # training and light workers, beat, Flower
    procs = {name: subprocess.Popen(cmd, env=env, start_new_session=True) for name, cmd in children.items()}
    console.print(f"[green]alignd is up: API on http://{settings.host}:{port or settings.port} "
                  f"({', '.join(procs)}); Ctrl-C stops everything")
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping:
            for name, p in procs.items():
                if p.poll() is not None:
                    console.print(f"[red]{name} exited with {p.returncode}; stopping everything")
                    stopping = True
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        if embedded is not None:
            embedded.stop()
        console.print("stopped")


@train_app.command("sft")
def train_sft_cmd(
    data: Annotated[Path, typer.Option(help="chat-format JSONL: one {\"messages\": [...]} per line")],
    base: Annotated[Optional[Path], typer.Option(help="causal-LM folder to start from (default: current policy)")]
    = None,
    seconds: Annotated[float, typer.Option(help="wall-clock budget")] = 120.0,
    as_json: JsonOpt = False,
):
    """Fine-tune a causal LM on chat-format JSONL and publish the result as a new policy version."""
    from alignd.runtime import publish_version
    from store import registry
    from training.model import load_causal_lm
    from training.sft import SFTConfig, train_sft

    settings = get_settings()
    settings.apply_torch_threads()
    conversations, bad = [], []
    for n, line in enumerate(data.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            assert isinstance(msgs, list) and all(m["role"] in ("system", "user", "assistant") and
                                                  isinstance(m["content"], str) for m in msgs)
            conversations.append(msgs)
        except Exception:
            bad.append(n)
    if bad:
        console.print(f"[yellow]skipped {len(bad)} malformed line(s): {bad[:20]}")
    if not conversations:
        console.print("[red]no valid conversations in the file")
        raise typer.Exit(2)
    _, r, _ = _redis(settings)
    current = registry.current_version(r)
    if base is None:
        if current is None:
            console.print("[red]no --base and no current policy: run `alignd bootstrap` or pass --base")
            raise typer.Exit(2)
        base = Path(registry.get_version(r, current)["path"])
    model, tok = load_causal_lm(base, settings.torch_device())
    metrics = train_sft(SFTConfig(max_seconds=seconds), model, tok, conversations)
    meta = {"source": "sft", "parent": current, "base": str(base), "data": str(data), "metrics": {}, "sft": metrics,
            "feedback": {"events": 0}, "annotators": [f"file:{data.name}"]}
    version = publish_version(r, settings, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)), meta,
                              expected_current=current)
    out = {"version": version, "sft": metrics, "skipped_lines": bad}
    print(json.dumps(out) if as_json else f"policy version {version} is current (loss {metrics['loss']:.3f})")



@app.command("export")
def export_cmd(
    out: Annotated[Path, typer.Option(help="output file (.jsonl, or .jsonl.gz to compress)")],
    fmt: Annotated[str, typer.Option("--format", help="hh (Anthropic HH-RLHF), trl (prompt/chosen/rejected messages)"
                                                     " or alignd (lossless: labels, margins, groups, provenance)")]
    = "hh",
    as_json: JsonOpt = False,
):
    """Write the preference data derived from feedback (and imports) to a file."""
    from store.exchange import export_preferences

    if fmt not in ("hh", "trl", "alignd"):
        console.print(f"[red]unknown format {fmt!r}: use hh, trl or alignd")
        raise typer.Exit(2)
    _, r, _ = _redis(get_settings())
    counts = export_preferences(r, fmt, out)
    print(json.dumps(counts) if as_json else f"wrote {counts} to {out}")


@app.command("import")
def import_cmd(
    path: Annotated[Path, typer.Argument(help="HH-RLHF, UltraFeedback-binarized or alignd JSONL (plain or .gz)")],
    as_json: JsonOpt = False,
):
    """Import preference data; bad lines are reported by number and skipped; importing twice adds nothing."""
    from store.exchange import import_preferences

    if not path.is_file():
        console.print(f"[red]{path} is not a file")
        raise typer.Exit(2)
    _, r, _ = _redis(get_settings())
    report = import_preferences(r, path)
    if as_json:
        print(json.dumps(report))
    else:
        console.print({k: v for k, v in report.items() if k != "bad_lines"})
        for line_no, reason in report.get("bad_lines", [])[:50]:
            console.print(f"[yellow]line {line_no}: {reason}")
    if report.get("bad_lines") and not report.get("imported") and not report.get("duplicates"):
        raise typer.Exit(1)

# worker, beat, flower, train cycle/reward/ppo, versions, rollback: the online loop's commands live with the workers
register_worker_commands(app, train_app)


# --- simulated users, the demo and the alignment report (logic in alignd/simulate.py, demo.py, report.py)


@app.command()
def simulate(
    users: Annotated[int, typer.Option(help="simulated users; styles dealt round-robin from --annotators")] = 8,
    minutes: Annotated[float, typer.Option(help="how long they chat")] = 1.0,
    url: Annotated[str, typer.Option(help="the alignd API")] = "http://127.0.0.1:8000",
    annotators: Annotated[str, typer.Option(help="styles: balanced, brevity, detail, strict")]
    = "balanced,brevity,detail,strict",
    noise: Annotated[float, typer.Option(help="label-flip probability")] = 0.25,
    keys_file: Annotated[Optional[Path], typer.Option("--keys", help="API keys, one per user: keys.json "
                                                      "({'users': {key: user}}) or key:user lines "
                                                      "(default ALIGND_API_KEYS)")] = None,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 8,
    rate: Annotated[Optional[float], typer.Option(help="chat requests per second, all users (default: no limit)")]
    = None,
    red_team: Annotated[float, typer.Option(help="share of turns that red-team: a harmful request, four answers "
                                                 "ranked")] = 0.1,
    red_team_temperature: Annotated[float, typer.Option(help="sampling temperature of red-teaming turns (higher "
                                                             "surfaces more failures to rank)")] = 1.0,
):
    """Drive a running alignd with simulated annotators (thumbs, pairwise and rank feedback); prints JSON counts."""
    from alignd.simulate import SimConfig, read_keys_file, simulate as run

    settings = get_settings()
    if keys_file is not None:
        keyring = read_keys_file(keys_file)
    elif settings.user_keys():
        keyring = settings.user_keys()
    elif (settings.home / "keys.json").exists():
        keyring = read_keys_file(settings.home / "keys.json")
    else:
        console.print("[red]no API keys: the server records the caller as the annotator, so each simulated user "
                      "needs its own key; pass --keys FILE or set ALIGND_API_KEYS")
        raise typer.Exit(2)
    cfg = SimConfig(url=url, users=users, seconds=minutes * 60, annotators=annotators, noise=noise,
                    concurrency=concurrency, rate=rate, red_team=red_team,
                    red_team_temperature=red_team_temperature)
    try:
        counts = run(cfg, keyring)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2)
    print(json.dumps(counts))
    if not counts["requests"] and counts["errors"]["total"]:
        console.print(f"[red]no request succeeded against {url}: {counts['errors']}")
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[Optional[Path], typer.Option(help="output folder (default ALIGND_HOME/report)")] = None,
    as_json: JsonOpt = False,
    compare: Annotated[Optional[Path], typer.Option(help="another run's report.json to compare with")] = None,
    evaluate: Annotated[bool, typer.Option(help="re-score every version on one evaluation set "
                                                "(--no-evaluate: the metrics recorded at publish)")] = True,
    oracle: Annotated[Optional[bool], typer.Option("--oracle/--no-oracle", help="oracle win rate (default: for "
                                                   "built-in-world models only)")] = None,
    eval_per_family: Annotated[int, typer.Option(help="evaluation prompts per task group")] = 40,
    sampled: Annotated[bool, typer.Option("--sampled/--greedy", help="score sampled answers (temperature 1, what "
                                          "users get) or greedy ones")] = True,
):
    """Build the alignment report (HTML + PNG plots + JSON) from this deployment's registry and feedback log."""
    from alignd.report import ReportConfig, build_report

    settings = get_settings()
    settings.apply_torch_threads()
    _, r, _ = _redis(settings)
    other = json.loads(compare.read_text()) if compare else None
    cfg = ReportConfig(evaluate=evaluate, oracle=oracle, eval_per_family=eval_per_family, sampled=sampled,
                       device=settings.torch_device())
    out = out or settings.home / "report"
    try:
        result = build_report(r, out, cfg, compare=other)
    except ValueError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2)
    if as_json:
        print(json.dumps(result, default=str))
    else:
        console.print(f"[green]report written to {out / 'report.html'}")


@app.command()
def demo(
    minutes: Annotated[float, typer.Option(help="wall-clock budget, bootstrap and report included")] = 15.0,
    annotators: Annotated[str, typer.Option(help="simulated annotator pool")] = "balanced,brevity,detail,strict",
    users: Annotated[int, typer.Option(help="simulated users")] = 8,
    cycles: Annotated[int, typer.Option(help="training cycles to complete at least")] = 3,
    as_json: JsonOpt = False,
    home: Annotated[Optional[Path], typer.Option(help="empty data directory (default: a new temporary one)")]
    = None,
    out: Annotated[Optional[Path], typer.Option(help="report folder (default HOME/report)")] = None,
    compare_pools: Annotated[Optional[tuple[str, str]], typer.Option(help="run twice with these two pools "
                                                                     "(e.g. brevity detail) and compare")]
    = None,
    sft_seconds: Annotated[float, typer.Option(help="bootstrap SFT budget")] = 120.0,
    base: Annotated[Optional[Path], typer.Option(help="start from this HF causal-LM folder instead of the "
                                                 "built-in SFT bootstrap")] = None,
    rate: Annotated[float, typer.Option(help="simulated chat requests per second")] = 4.0,
    first_feedback: Annotated[int, typer.Option(help="feedback events before the first cycle")] = 300,
    min_feedback: Annotated[int, typer.Option(help="new feedback events before each later cycle")] = 100,
    cycle_config: Annotated[Optional[str], typer.Option(help="CycleConfig overrides as JSON")] = None,
    eval_per_family: Annotated[int, typer.Option(help="report evaluation prompts per task group")] = 40,
):
    """From an empty data directory: bootstrap, serve, simulated users, training cycles with hot-swaps, report."""
    from alignd.demo import DemoConfig, brief, print_tables, run_compare, run_demo
    from alignd.report import ReportConfig

    cfg = DemoConfig(minutes=minutes, annotators=annotators, users=users, cycles=cycles, home=home, out=out,
                     sft_seconds=sft_seconds, base=base, rate=rate, first_feedback=first_feedback,
                     min_feedback=min_feedback,
                     cycle_config=json.loads(cycle_config) if cycle_config else {},
                     report=ReportConfig(eval_per_family=eval_per_family))
    log = lambda msg: console.print(msg)  # noqa: E731
    try:
        if compare_pools and all(compare_pools):
            result = run_compare(cfg, compare_pools, log)
            summaries = result["runs"]
        else:
            summaries = [run_demo(cfg, log)]
    except (ValueError, RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed: {exc}")
        raise typer.Exit(1)
    for s in summaries:
        print_tables(s, console)
    if as_json:
        print(json.dumps([brief(s) for s in summaries] if len(summaries) > 1 else brief(summaries[0]), default=str))


if __name__ == "__main__":
    app()
