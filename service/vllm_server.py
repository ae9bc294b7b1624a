"""A vLLM OpenAI server that alignd starts, health-checks, restarts and stops (`ALIGND_VLLM_PYTHON`).

vLLM pins its own torch, transformers and fastapi, so it lives in a venv of its own (`scripts/install-vllm`) and alignd
runs `python -m vllm.entrypoints.openai.api_server` from there; alignd never imports vllm. On a CPU the server gets
the settings vLLM's CPU documentation asks for — every core for its OpenMP threads (`VLLM_CPU_OMP_THREADS_BIND`; by
default it keeps one of two cores for its front end and decodes on one), tcmalloc and the venv's libiomp5 preloaded —
which served 1.5x more at 16 clients on 2 cores. Runtime LoRA loading (`/v1/load_lora_adapter`) needs
`VLLM_ALLOW_RUNTIME_LORA_UPDATING`.

A monitor thread restarts the server when it exits (after a short back-off); while it is down the engine answers 503
`engine_unavailable` and reloads its adapters once it is back (service/vllm_engine.py).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from core.config import Settings
from core.redis_server import free_port

log = logging.getLogger("alignd.vllm")

PR_SET_PDEATHSIG = 1  # linux/prctl.h
RESTART_BACKOFF_S = 2.0  # between a crash and the restart: a server that dies at start must not spin
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
)


def cpu_environment(python: str, kv_cache_gib: int, cores: int | None = None) -> dict[str, str]:
    """What vLLM's CPU backend needs from its environment (module docstring). Its KV cache is sized in GiB: left to
    itself it reserves 92 % of the host's memory and refuses to start beside anything else."""
    cores = cores or os.cpu_count() or 1
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
        "OMP_NUM_THREADS": str(cores),
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
    }
    preload = [p for p in TCMALLOC_PATHS if Path(p).exists()][:1]
    iomp = Path(python).resolve().parent.parent / "lib" / "libiomp5.so"  # the venv's intel-openmp
    if not iomp.exists():
        iomp = Path(python).parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        preload.append(str(iomp))
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


class ManagedVLLM:
    """One vLLM server process on `base_dir`, named `served_name`, kept running until `stop`."""

    def __init__(self, settings: Settings, base_dir: Path, served_name: str, dtype: str, context: int | None = None):
        if not settings.vllm_python:
            raise ValueError(
                "ALIGND_VLLM_PYTHON is not set: name the python of a venv with vLLM (scripts/install-vllm)"
            )
        self.settings = settings
        self.python = settings.vllm_python
        self.base_dir = Path(base_dir)
        self.served_name = served_name
        self.dtype = dtype
        self.context = context
        self.port = settings.vllm_port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = settings.home / "logs" / "vllm.log"
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    def command(self) -> list[str]:
        s = self.settings
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.base_dir)]
        cmd += ["--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--dtype", self.dtype, "--enable-lora", "--max-lora-rank", str(s.vllm_max_lora_rank)]
        cmd += ["--max-loras", str(s.vllm_max_loras), "--seed", "0", "--disable-uvicorn-access-log"]
        if self.context:
            cmd += ["--max-model-len", str(self.context)]
        return cmd + shlex.split(s.vllm_args)

    def environment(self) -> dict[str, str]:
        # not alignd's settings (its keys, the Redis URL with its password), nor its PYTHONPATH, whose packages would
        # shadow the vLLM venv's own transformers and fastapi
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALIGND_") and k != "PYTHONPATH"}
        env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_NO_USAGE_STATS": "1"})
        if not self.settings.torch_device().startswith("cuda"):
            env.update(
                {
                    k: v
                    for k, v in cpu_environment(self.python, self.settings.vllm_cpu_kv_cache_gib).items()
                    if k not in os.environ
                }
            )
        return env

    def start(self, wait: bool = True) -> ManagedVLLM:
        self._spawn()
        if wait:
            self.wait_healthy(self.settings.vllm_start_timeout_s)
        self._monitor = threading.Thread(target=self._watch, name="alignd-vllm-monitor", daemon=True)
        self._monitor.start()
        return self

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open for its lifetime
        log.info("starting vLLM on %s (port %d); log: %s", self.base_dir, self.port, self.log_path)
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: a crash drill or `stop` reaches its engine processes too
            preexec_fn=_die_with_parent,
        )
        out.close()

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.process.returncode} while starting; see {self.log_path}:\n"
                    + self.log_tail()
                )
            if self.healthy():
                return
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not answer /health within {timeout:g} s; see {self.log_path}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _watch(self) -> None:
        """Restart the server whenever it exits, until `stop`."""
        while not self._stop.wait(0.5):
            if self.process is None or self.process.poll() is None:
                continue
            log.error("vLLM exited with %s; restarting in %.0f s", self.process.returncode, RESTART_BACKOFF_S)
            _kill_group(self.process.pid)  # its engine-core and worker processes outlive the API server's death
            if self._stop.wait(RESTART_BACKOFF_S):
                return
            self.restarts += 1
            self._spawn()

    def kill(self) -> None:
        """SIGKILL the server and its engine processes (a crash drill; the monitor restarts it)."""
        if self.process is not None:
            _kill_group(self.process.pid)

    def stop(self, timeout: float = 20.0) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=2)
        p = self.process
        if p is None:
            return
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(p.pid)  # whatever of its engine processes is left


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), so a
    killed `alignd serve` leaves no vLLM server holding the port and the memory."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc Linux: `stop` still ends it on a clean exit
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
