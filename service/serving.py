"""The engine of one API process, built for the registry's current version: alignd's own or vLLM (`ALIGND_ENGINE`).

    engine = build_engine(settings, r, version)      # alignd serve, and each `--workers N` process

With vLLM, the base that vLLM serves is the current version's SFT/base version (the model its adapters were trained
on); `start_vllm` starts and supervises one from `ALIGND_VLLM_PYTHON` unless `ALIGND_VLLM_URL` names a running one.
An external server must serve that very folder (as it sees the checkpoint root, `ALIGND_VLLM_CHECKPOINT_ROOT`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import redis

from core.config import Settings
from core.threads import BusyFlag, busy_dir
from store import registry
from training.lora import adapter_base, folder_digest, parameter_count

log = logging.getLogger("alignd.serving")

BASE_MODEL_NAME = "alignd-base"  # the name alignd gives the base model of a vLLM server it starts


def build_engine(settings: Settings, r: redis.Redis, version: int, server=None):
    """The engine serving `version`; `server` is a ManagedVLLM the caller started (alignd serve --workers N)."""
    if serving_engine(settings, r, version) == "builtin":
        from service.engine import Engine
        from service.loader import load_version

        policy = load_version(r, settings, version)
        threads = settings.serving_threads(policy.parameters)
        engine = Engine(policy, max_batch_size=settings.max_batch_size, threads=threads)
        if settings.share_cores == "follow" and not settings.torch_device().startswith("cuda"):
            engine.on_busy = BusyFlag(busy_dir(settings.home)).set  # a training worker of this home narrows meanwhile
        return engine
    return build_vllm_engine(settings, r, version, server)


def serving_engine(settings: Settings, r: redis.Redis, version: int) -> str:
    """The engine for serving `version`: ALIGND_ENGINE, `auto` decided by the size of the model vLLM would serve."""
    if settings.engine != "auto":
        return settings.engine
    return settings.serving_engine(parameter_count(vllm_base(settings, r, version)[1]))


def vllm_base(settings: Settings, r: redis.Redis, version: int) -> tuple[int, Path]:
    """(version, folder) of the model vLLM serves for `version`: the version itself when it holds whole weights, else
    the base its adapter was trained on (its SFT/base version)."""
    path = registry.version_path(settings, r, version)
    base = adapter_base(path)
    if base is None:
        return version, path
    return registry.reference_version(r, version), settings.checkpoint(base["base"])


def vllm_dtype(settings: Settings, base_dir: Path) -> str:
    """The dtype vLLM serves in: ALIGND_DTYPE, or the builtin engine's auto rule for this model and device."""
    if settings.dtype != "auto":
        return settings.dtype
    dtype = settings.serving_dtype(parameter_count(base_dir))
    return str(dtype).removeprefix("torch.")


def vllm_path_map(settings: Settings):
    """A checkpoint folder as the vLLM server sees it (ALIGND_VLLM_CHECKPOINT_ROOT)."""
    if not settings.vllm_checkpoint_root:
        return lambda p: str(Path(p))
    root, theirs = settings.checkpoints_dir, settings.vllm_checkpoint_root.rstrip("/")

    def mapped(p) -> str:
        try:
            return f"{theirs}/{Path(p).resolve().relative_to(root)}"
        except ValueError:  # outside the root (a registered base model): the same path there
            return str(p)

    return mapped


def start_vllm(settings: Settings, r: redis.Redis, version: int):
    """Start and supervise a vLLM server on `version`'s base (ALIGND_VLLM_PYTHON); returns the ManagedVLLM."""
    from service.vllm_server import ManagedVLLM

    _, base_dir = vllm_base(settings, r, version)
    return ManagedVLLM(settings, base_dir, BASE_MODEL_NAME, vllm_dtype(settings, base_dir)).start()


def build_vllm_engine(settings: Settings, r: redis.Redis, version: int, server=None):
    from service.loader import load_version
    from service.vllm_engine import ServedVersion, VLLMEngine
    from training.model import load_tokenizer

    base_version, base_dir = vllm_base(settings, r, version)
    owned = server is None and not settings.vllm_url
    if owned:
        server = start_vllm(settings, r, version)
    url = settings.vllm_url or server.url
    path_map = vllm_path_map(settings)
    model = served_base(url, path_map(base_dir))
    tokenizer = load_tokenizer(base_dir)
    base = ServedVersion(base_version, model["id"], tokenizer, int(model["max_model_len"]), str(base_dir))
    exclusive = owned and settings.serve_workers == 1
    engine = VLLMEngine(url, base, exclusive=exclusive, drain_grace_s=settings.request_timeout_s, path_map=path_map)
    engine.base_digest = folder_digest(base_dir)
    engine.server = server if owned else None  # stopped with the engine
    engine.start()
    if version != base_version:
        try:
            engine.swap(load_version(r, settings, version, engine))
        except Exception:
            engine.stop()
            raise
    return engine


def served_base(url: str, expected_root: str, timeout: float = 10.0) -> dict:
    """vLLM's base model entry (`/v1/models`), checked to be the folder alignd's adapters were trained on."""
    data = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout).json()["data"]
    bases = [m for m in data if not m.get("parent")]
    if not bases:
        raise RuntimeError(f"vLLM at {url} lists no base model")
    model = bases[0]
    if Path(model.get("root") or "") != Path(expected_root):
        raise RuntimeError(
            f"vLLM at {url} serves {model.get('root')!r}, but this deployment's base is {expected_root!r}: start vLLM "
            "with --model on that folder (ALIGND_VLLM_CHECKPOINT_ROOT if it sees the checkpoint root elsewhere)"
        )
    return model
