"""The processes of a deployment: `alignd up` (all of them), `serve`, `worker`, `beat`, `flower`, `keys`.

alignd up                     # embedded Redis, bootstrap on first start, API, workers, beat, Flower
alignd serve --port 8000      # the API alone
alignd worker --queues train  # a Celery worker (starts the embedded Redis if needed)
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from alignd.commands.common import JsonOpt, app, child_env, console, open_redis
from core import names
from core.config import Settings, get_settings
from core.threads import TRAIN_NICE

CELERY = [sys.executable, "-m", "celery", "-A", "workers.celery_app"]
ALIGND = [sys.executable, "-m", "alignd.cli"]


def children(exe: list[str]) -> dict[str, list[str]]:
    """Processes `alignd up` runs besides Redis and the API: a training worker (train queue, one cycle at a time),
    a light worker (default queue), beat and Flower."""
    return {
        "worker-train": [*ALIGND, "worker", "--queues", names.TRAIN_QUEUE, "--concurrency", "1", "--name", "train"],
        "worker": [*ALIGND, "worker", "--queues", names.DEFAULT_QUEUE, "--pool", "solo", "--name", "default"],
        "beat": [*ALIGND, "beat"],
        "flower": [*ALIGND, "flower"],
    }


def spawn(settings: Settings, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start one of `alignd up`'s processes in its own session. With `share_cores=follow` on a CPU the training worker
    runs at nice TRAIN_NICE without ALIGND_TORCH_THREADS: its cycles take every core while the API is idle and half
    while it serves (core/threads.py follow_load). Its OpenMP threads sleep as soon as they wait (unless
    OMP_WAIT_POLICY says otherwise): a low-priority thread spinning at a barrier for a teammate the kernel has
    paused for the API holds a core for nothing (`bench/share_cores.py`: 5-6x the steps of spinning ones)."""
    nice = 0
    if name == "worker-train" and settings.shared_machine_threads() and settings.share_cores == "follow":
        env = {k: v for k, v in env.items() if k != "ALIGND_TORCH_THREADS"}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        nice = TRAIN_NICE
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=(lambda: os.nice(nice)) if nice else None)


FLOWER_MIN_PASSWORD = 12  # characters; production refuses shorter ones and placeholders


def flower_credentials(home: Path, *, production: bool = False) -> tuple[str, bool]:
    """'user:password' for Flower: FLOWER_BASIC_AUTH (Flower's own variable) or one generated under home
    (mode 0600); the flag says whether it was generated now. In production a placeholder (`changethis`) or a
    short password is refused (ValueError)."""
    configured = os.environ.get("FLOWER_BASIC_AUTH")
    if configured:
        password = configured.partition(":")[2]
        if production and ("changethis" in password or len(password) < FLOWER_MIN_PASSWORD):
            raise ValueError(
                "FLOWER_BASIC_AUTH must be 'user:password' with a real password of at least "
                f"{FLOWER_MIN_PASSWORD} characters when ALIGND_ENV=production"
            )
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


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="bind address (default ALIGND_HOST)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default ALIGND_PORT)")] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            help="API processes sharing the port, each following the registry (default ALIGND_SERVE_WORKERS)"
        ),
    ] = None,
):
    """Run the API: OpenAI-compatible chat, feedback, admin, metrics."""
    import uvicorn

    from service.app import create_app
    from service.serving import build_engine, serving_engine, start_vllm
    from store import registry

    settings = get_settings()
    settings.apply_torch_threads(serving=True)
    url, r, _ = open_redis(settings)
    version = registry.current_version(r)
    if version is None:
        console.print("[red]no policy version is registered: run `alignd bootstrap` (or `alignd up`) first")
        raise typer.Exit(2)
    # The engine thread must get the GIL back as soon as a torch op returns; with the default 5 ms switch interval
    # the event loop's threads hold it for whole intervals and single-stream decoding runs ~2x slower (bench/serve.py).
    sys.setswitchinterval(0.0005)
    workers = workers or settings.serve_workers
    vllm = serving_engine(settings, r, version) == "vllm"
    server = engine = None
    try:
        if workers == 1:
            engine = build_engine(settings, r, version)
        elif vllm:  # one vLLM server for every API process, each driving it over HTTP
            server = None if settings.vllm_url else start_vllm(settings, r, version)
        else:  # the version is checked here once, then each worker loads it again (service.app.app_from_env)
            build_engine(settings, r, version).stop()
    except Exception as exc:  # corrupt, unloadable or failing its smoke test: refuse to start rather than hang
        console.print(
            f"[red]cannot serve policy v{version}: {type(exc).__name__}: {exc}\n"
            "roll back to a good version (`alignd rollback VERSION`) or publish a fixed one, then start "
            "again"
        )
        raise typer.Exit(3) from None
    if workers > 1:
        _serve_workers(settings, url, host, port, workers, server)
        return
    application = create_app(settings, url, engine)
    keyring = application.state.alignd.keyring
    if keyring.generated:
        console.print(f"[bold]generated API keys (kept in {settings.home / 'keys.json'}):")
        for key, user in keyring.users.items():
            console.print(f"  key for {user}: {key}")
        console.print(f"  admin key: {keyring.admin_key}")
    console.print(f"serving policy v{version} on http://{host or settings.host}:{port or settings.port}")
    uvicorn.run(application, host=host or settings.host, port=port or settings.port, log_level="info")


def _serve_workers(settings, url: str, host: str | None, port: int | None, workers: int, server=None) -> None:
    """uvicorn with `workers` processes, each building its app with service.app.app_from_env; keys are generated
    here once, so the processes share them, and so is a vLLM server (`server`, stopped when uvicorn returns)."""
    import uvicorn

    from service.auth import load_keyring

    keyring = load_keyring(settings)
    if keyring.generated:
        console.print(f"[bold]generated API keys (kept in {settings.home / 'keys.json'}); `alignd keys` prints them")
    os.environ.update(
        {"ALIGND_REDIS_URL": url, "ALIGND_HOME": str(settings.home), "ALIGND_SERVE_WORKERS": str(workers)}
    )
    if server is not None:
        os.environ.update({"ALIGND_VLLM_URL": server.url, "ALIGND_ENGINE": "vllm"})
    console.print(f"serving with {workers} API processes on http://{host or settings.host}:{port or settings.port}")
    try:
        uvicorn.run(
            "service.app:app_from_env",
            factory=True,
            workers=workers,
            host=host or settings.host,
            port=port or settings.port,
            log_level="info",
        )
    finally:
        if server is not None:
            server.stop()


@app.command()
def keys(as_json: JsonOpt = False):
    """Print the API keys (configured or generated under ALIGND_HOME)."""
    from service.auth import load_keyring

    kr = load_keyring(get_settings())
    if as_json:
        print(json.dumps({"users": kr.users, "admin_key": kr.admin_key}))
    else:
        for key, user in kr.users.items():
            print(f"key for {user}: {key}")
        print(f"admin key: {kr.admin_key}")


@app.command()
def up(
    port: Annotated[Optional[int], typer.Option(help="API port (default ALIGND_PORT)")] = None,
    seconds: Annotated[float, typer.Option(help="SFT budget if bootstrapping")] = 180.0,
):
    """Run everything: embedded Redis (unless ALIGND_REDIS_URL), bootstrap on first start, API, worker, beat,
    Flower. Ctrl-C stops them all."""
    from store import registry

    settings = get_settings()
    url, r, embedded = open_redis(settings)
    env = child_env(settings, url)
    if registry.current_version(r) is None:
        console.print("first start: bootstrapping the SFT assistant")
        subprocess.run([*ALIGND, "bootstrap", "--seconds", str(seconds)], env=env, check=True)
    shared = settings.shared_machine_threads()  # the API and the training worker share the cores (bootstrap ran alone)
    if shared:
        env["ALIGND_TORCH_THREADS"] = str(shared)
    procs_cmds = {"api": [*ALIGND, "serve", "--port", str(port or settings.port)]}
    procs_cmds.update(children(ALIGND))  # training and light workers, beat, Flower
    procs = {name: spawn(settings, name, cmd, env) for name, cmd in procs_cmds.items()}
    console.print(
        f"[green]alignd is up: API on http://{settings.host}:{port or settings.port} "
        f"({', '.join(procs)}); Ctrl-C stops everything"
    )
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


@app.command()
def worker(
    queues: Annotated[str, typer.Option(help="comma list of queues: train, default")] = "train,default",
    concurrency: Annotated[int, typer.Option(help="processes; keep 1 on a train worker")] = 1,
    pool: Annotated[str, typer.Option(help="prefork enforces time limits; solo for light queues")] = "prefork",
    name: Annotated[str, typer.Option(help="worker node name (…@host)")] = "alignd",
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info",
):
    """Run a Celery worker (the train queue runs one cycle at a time)."""
    settings = get_settings()
    url, _, embedded = open_redis(settings)
    cmd = [
        *CELERY,
        "worker",
        "-Q",
        queues,
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "-n",
        f"{name}@%h",
        "-l",
        loglevel,
    ]
    _run_child(cmd, child_env(settings, url), embedded)


@app.command()
def beat(loglevel: Annotated[str, typer.Option(help="Celery log level")] = "info"):
    """Run Celery beat: checks for new feedback every ALIGND_CYCLE_SECONDS, watches arena win rates."""
    settings = get_settings()
    url, _, embedded = open_redis(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    cmd = [*CELERY, "beat", "-s", str(settings.home / "celerybeat-schedule"), "-l", loglevel]
    _run_child(cmd, child_env(settings, url), embedded)


@app.command()
def flower(port: Annotated[Optional[int], typer.Option(help="port (default ALIGND_FLOWER_PORT)")] = None):
    """Run Flower (task monitor) with HTTP basic auth; credentials are generated and printed if unset."""
    settings = get_settings()
    url, _, embedded = open_redis(settings)
    try:
        cred, generated = flower_credentials(settings.home, production=settings.env == "production")
    except ValueError as exc:
        console.print(f"[red]{exc}")
        raise typer.Exit(2) from None
    port = port or settings.flower_port
    user, _, password = cred.partition(":")
    # a password is printed only by the start that generated it: one from the environment or the file is not ours
    # to show (logs are read by more people than the secret's owner)
    where = (
        f"password {password!r} (generated, kept in {settings.home / 'flower.json'})"
        if generated
        else (
            "password from FLOWER_BASIC_AUTH"
            if os.environ.get("FLOWER_BASIC_AUTH")
            else f"password in {settings.home / 'flower.json'}"
        )
    )
    console.print(f"[bold]Flower on http://{settings.host}:{port}  user {user!r} {where}")
    cmd = [sys.executable, "-m", "alignd.flower", f"--port={port}", f"--address={settings.host}"]
    # the credentials travel in Flower's own environment variable, not on a command line `ps` shows
    _run_child(cmd, {**child_env(settings, url), "FLOWER_BASIC_AUTH": cred}, embedded)
