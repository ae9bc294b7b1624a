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

app = typer.Typer(help="alignd: online alignment of a served chat model.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
train_app = typer.Typer(help="Run one training step synchronously (SFT, reward model, PPO, a full cycle).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")
console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]


def _threads(settings) -> None:
    import torch

    torch.set_num_threads(settings.torch_threads or os.cpu_count() or 1)


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
    seconds: Annotated[float, typer.Option(help="SFT wall-clock budget")] = 120.0,
    base: Annotated[Optional[Path], typer.Option(help="register this local HF causal-LM folder instead")] = None,
    force: Annotated[bool, typer.Option(help="publish a new SFT version even if one exists")] = False,
    as_json: JsonOpt = False,
):
    """Build the SFT assistant (or register --base) as the first policy version and print its checker scores."""
    from tqdm import tqdm

    from alignd.runtime import publish_version
    from store import registry

    settings = get_settings()
    _threads(settings)
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
        from training.sft import SFTConfig

        cfg = BootstrapConfig(sft=SFTConfig(max_seconds=seconds))
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
    _threads(settings)
    url, r, _ = _redis(settings)
    version = registry.current_version(r)
    if version is None:
        console.print("[red]no policy version is registered: run `alignd bootstrap` (or `alignd up`) first")
        raise typer.Exit(2)
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
    seconds: Annotated[float, typer.Option(help="SFT budget if bootstrapping")] = 120.0,
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
    children.update(_extra_children(exe))
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


def _extra_children(exe: list[str]) -> dict[str, list[str]]:
    """Processes besides the API that `up` runs (worker, beat, Flower) when the workers package provides them."""
    try:
        from workers import processes
    except ImportError:
        return {}
    return processes.children(exe)


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
    _threads(settings)
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


if __name__ == "__main__":
    app()
