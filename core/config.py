"""The one settings object of alignd, read from `ALIGND_*` environment variables (pydantic-settings).

Every component takes its configuration from `get_settings()`; nothing else reads `os.environ`.
The README's configuration table lists these fields.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# `dtype=auto` serves in bfloat16 on a CPU with native bf16 from this size up. Measured on 2 shared cores with
# avx512_bf16 (bench/serve.py --single-stream, bench/dtype.py): at the 135 M SmolLM2 shape bf16 decoded 1.2x faster one
# request at a time and HF's static batch of 16 2.3x faster; the built-in 2 M model gained nothing (HF generate 0.75x
# in bf16, its batched evaluation equally fast), though its scores were unchanged (249/260 greedy answers identical).
# `quantize=auto` adds int8 decode layers (service/quantize.py) wherever that rule gives bf16 on a CPU: at the 135 M
# shape one stream decoded 1.66x faster than HF float32 eager (bf16 alone: 1.06x in the same run), its greedy tokens as
# close to float32's as bf16's are (0.90 vs 0.89 of them before the first difference), and 16 HTTP clients ran as fast
# as without it (140 vs 134 tokens/s): batches of more than 4 rows never use the int8 weights.
BF16_MIN_PARAMETERS = 50_000_000

# Serving gives the engine every core from this size up, and leaves one to the event loop below it. Measured on 2
# cores, `python bench/serve.py … --server-threads 1|2`, alternating runs: the built-in 2 M model with 16 streaming
# clients served 2,181 / 2,505 tokens/s on one engine thread against 1,957 / 2,194 on two (each token costs the server
# and its clients about as much as its share of the tiny decode step, and both need the GIL); the 135 M shape 188 / 214
# on one against 226 / 272 on two, and one stream 52 against 69 tokens/s. Nothing between the two sizes was measured.
ENGINE_ALL_CORES_MIN_PARAMETERS = 50_000_000

# `engine=auto` serves through vLLM where one is configured (ALIGND_VLLM_URL or ALIGND_VLLM_PYTHON) and either the
# device is a GPU or the model has at least VLLM_MIN_PARAMETERS parameters. On 2 idle CPU cores (`python bench/serve.py
# --engine builtin,vllm`, docs/benchmarks.md#vllm): at the built-in size (a 1.8 M Llama) alignd's own engine served
# 398 tokens/s to one client and 2,316 to 16, vLLM's CPU build 253 and 1,761 called directly, 222 and 1,171 through
# alignd; at the 135 M shape vLLM served 1.21x alignd's engine to one client and 1.37x to 16 (1.16x and 1.32x through
# alignd). vLLM's paged attention, CUDA graphs and tensor parallelism pay off on GPUs.
VLLM_MIN_PARAMETERS = 50_000_000
VLLM_AUTO_RULE = "vllm where one is configured and the device is a GPU or the model has >= 50 M parameters"


KEY_OPTIONS = ("feedback", "annotator", "expires=")  # what may follow `key:user:` in ALIGND_API_KEYS


@dataclass(frozen=True)
class KeyGrant:
    """What one API key may do: `ALIGND_API_KEYS` entries are `key:user[:option+option…]`, options `feedback` (the key
    may only send feedback: what a browser widget holds), `annotator` (a trusted annotation tool: each of its `user`
    values is a distinct annotator in arena counts and may vote on any completion of its user id) and
    `expires=2027-01-31` (an ISO date or time, UTC unless it says otherwise; after it the key answers 401)."""

    user: str
    feedback_only: bool = False
    annotator: bool = False
    expires: datetime | None = None


def parse_key_entry(item: str) -> tuple[str, KeyGrant]:
    """One `ALIGND_API_KEYS` entry, or ValueError saying what is wrong with it."""
    key, user, options = (item.split(":", 2) + ["", ""])[:3]
    if not key or not user:
        raise ValueError(f"ALIGND_API_KEYS entry {item!r} is not 'key:user' (or 'key:user:options')")
    grant = {"user": user}
    for option in filter(None, options.split("+")):
        if option == "feedback":
            grant["feedback_only"] = True
        elif option == "annotator":
            grant["annotator"] = True
        elif option.startswith("expires="):
            try:
                when = datetime.fromisoformat(option.removeprefix("expires="))
            except ValueError:
                raise ValueError(f"ALIGND_API_KEYS entry for user {user!r}: {option!r} is not an ISO date") from None
            grant["expires"] = when if when.tzinfo else when.replace(tzinfo=UTC)
        else:
            raise ValueError(
                f"ALIGND_API_KEYS entry for user {user!r}: unknown option {option!r} "
                "(options: feedback, annotator, expires=YYYY-MM-DD, joined by '+')"
            )
    return key, KeyGrant(**grant)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGND_", extra="ignore")

    env: Literal["development", "production"] = Field("development", description="production refuses unsafe values")
    home: Path = Field(Path(".alignd"), description="data directory: models, checkpoints, embedded Redis files, keys")
    checkpoint_root: Path | None = Field(
        None,
        description="checkpoint folders; unset: HOME/checkpoints. The registry "
        "keeps paths relative to it, so a home or a shared mount can move",
    )
    redis_url: str | None = Field(None, description="external Redis; unset starts an embedded redis-server under home")
    embedded_redis_port: int = Field(0, description="TCP port of the embedded Redis; 0 picks a free one")
    key_prefix: str = Field(
        "alignd",
        description="every Redis key of this deployment, Celery's queues and results included, starts with "
        "'PREFIX:', so deployments with different prefixes share one Redis database",
    )
    redis_max_connections: int = Field(
        64, ge=1, description="Redis connections of one API process; requests wait for a free one (bounded)"
    )
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, description="how long a request waits for a free Redis connection before 503 redis_unavailable"
    )
    api_keys: str | None = Field(None, description="'key1:alice,key2:bob'; unset generates keys under home")
    admin_key: str | None = Field(None, description="admin key; unset generates one under home")
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="torch device for serving and training: auto, cpu, cuda, cuda:1 …",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights and KV cache of served models (logits and sampling stay float32); auto: bfloat16 on a "
        "GPU that has it, and on a CPU with native bf16 for models of at least BF16_MIN_PARAMETERS, else float32",
    )
    compile: bool = Field(
        False, description="torch.compile each served model's forward (slow first requests; measure before enabling)"
    )
    quantize: Literal["auto", "none", "int8"] = Field(
        "auto",
        description="int8: decode steps of up to 4 rows use int8 copies of the linear weights (CPU only; faster one "
        "request at a time, greedy answers can differ; prefill and larger batches keep the serving dtype); auto: "
        "int8 where a CPU serves a model in bfloat16 (the dtype's auto rule), none otherwise",
    )
    torch_threads: int | None = Field(
        None,
        description="torch intra-op threads; unset: all cores for training; for serving, the engine's thread gets "
        "all cores (split between serve_workers) for models of 50 M parameters and more, all but one below",
    )
    share_cores: Literal["follow", "split"] = Field(
        "follow",
        description="how `alignd up` and `alignd demo` share a CPU machine between the API and the training "
        "worker: follow: training on every core at nice 19 with passive OpenMP waits, each optimiser step that starts "
        "while an API process of this home has requests in flight on half; split: half each whatever the load",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    serve_workers: int = Field(
        1,
        ge=1,
        description="API processes of `alignd serve`, each with its own engine and "
        "registry follower (uvicorn workers sharing the port)",
    )

    # --- serving engine (docs/engines.md)
    engine: Literal["auto", "builtin", "vllm"] = Field(
        "auto",
        description="what generates tokens: builtin (alignd's continuous-batching engine, CPU), vllm (a vLLM "
        "OpenAI server each API process drives), auto: vllm where a vLLM is configured (vllm_url or vllm_python) "
        "and the device is a GPU or the model has 50 M parameters or more, builtin otherwise (VLLM_AUTO_RULE says "
        "what was measured)",
    )
    builtin_arch: Literal["auto", "gpt2", "llama"] = Field(
        "auto",
        description="architecture of the assistant `alignd bootstrap` builds; auto: llama when the engine is vllm "
        "(vLLM has no LoRA for GPT-2), gpt2 otherwise",
    )
    vllm_url: str | None = Field(
        None, description="an external vLLM server (http://host:port); unset with engine vllm: alignd starts one"
    )
    vllm_python: str | None = Field(
        None,
        description="the python of a venv with vLLM installed (scripts/install-vllm): `alignd serve` starts, "
        "health-checks and restarts a vLLM server with it and stops it on exit",
    )
    vllm_port: int = Field(0, ge=0, description="port of the vLLM server alignd starts; 0 picks a free one")
    vllm_args: str = Field(
        "", description="extra arguments of the vLLM server alignd starts ('--tensor-parallel-size 2 …')"
    )
    vllm_max_lora_rank: int = Field(16, ge=1, description="largest adapter rank vLLM accepts (alignd trains 16)")
    vllm_max_loras: int = Field(4, ge=2, description="adapters vLLM batches together (arena needs 2)")
    vllm_checkpoint_root: str | None = Field(
        None,
        description="the checkpoint root as the vLLM server sees it (a container mounting it elsewhere); unset: "
        "the same path as alignd's",
    )
    vllm_cpu_kv_cache_gib: int = Field(
        2, ge=1, description="KV-cache memory of a vLLM server alignd starts on a CPU (otherwise 92 % of the host's)"
    )
    vllm_start_timeout_s: float = Field(600.0, gt=0, description="a vLLM server alignd starts must answer by then")

    # --- serving limits
    max_batch_size: int = Field(32, ge=1, le=256, description="sequences decoded together by the engine")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_prompt_tokens: int = Field(384, ge=8, description="longer prompts get 413")
    max_new_tokens: int = Field(256, ge=1, description="upper bound for max_tokens")
    default_max_tokens: int = Field(64, ge=1)
    max_inflight: int = Field(
        128,
        ge=1,
        description="sequences (n per request) generating or waiting in one API process; a request that would go "
        "over gets 503 server_overloaded with Retry-After at once, never a queue",
    )
    key_inflight_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="share of max_inflight one key may hold; beyond it 429 too_many_inflight (room stays for others)",
    )
    key_inflight_tokens: int = Field(
        16_384, ge=1, description="n x max_tokens of one key's requests in flight in one API process before 429"
    )
    chat_rate_per_minute: int = Field(
        600, ge=1, description="chat requests per person (key, `user`) per minute before 429"
    )
    key_chat_rate_per_minute: int = Field(
        1200, ge=1, description="chat requests per key (all its `user` values together) per minute before 429"
    )
    key_tokens_per_minute: int = Field(
        400_000,
        ge=1,
        description="tokens per key per minute before 429: prompt tokens + n x max_tokens, counted at admission",
    )

    # --- feedback limits
    max_comment_chars: int = Field(2000, ge=0)
    feedback_rate_per_minute: int = Field(6000, ge=1, description="feedback events per user per minute before 429")
    feedback_daily_cap: int = Field(100_000, ge=1, description="feedback events per user per UTC day before 429")
    key_feedback_rate_per_minute: int = Field(
        12_000, ge=1, description="feedback events per key (all its `user` values together) per minute before 429"
    )
    key_feedback_daily_cap: int = Field(
        200_000, ge=1, description="feedback events per key (all its `user` values together) per UTC day"
    )
    key_annotators_per_day: int = Field(
        1000,
        ge=1,
        description="distinct `user` values one key may vote as per UTC day before 429 (keys marked `annotator` "
        "and the admin key are exempt)",
    )

    # --- retention (docs/safety.md)
    completion_ttl_s: int | None = Field(
        7 * 86400,
        ge=60,
        description="a completion without feedback is deleted after this many seconds (feedback on it is refused "
        "after that); one with feedback is kept as training data; unset: keep every completion",
    )
    feedback_records_ttl_s: int = Field(
        30 * 86400,
        ge=3600,
        description="idempotency records (a retry with the same feedback_id is recognised within this window) and "
        "vote histories (revision numbers count within it) expire this long after their last write",
    )
    feedback_archive_dir: Path | None = Field(
        None,
        description="feedback-log entries are appended here (feedback-YYYYMMDD.jsonl, fsync'd) before they are "
        "trimmed, in a form `alignd import` restores the votes from; unset: trimmed entries are not archived",
    )
    gc_keep: int = Field(
        5,
        ge=0,
        description="after each published version, checkpoint GC (`alignd gc --keep N`) runs with this N; "
        "0: only when run by hand",
    )

    # --- the online loop
    cycle_seconds: int = Field(300, ge=1, description="beat checks for new feedback this often")
    min_new_feedback: int = Field(50, ge=1, description="a cycle runs only with at least this many new events")
    arena: bool = Field(False, description="n=2 requests get one choice from the current and one from the parent")
    arena_rollback_below: float = Field(0.35, description="live win rate vs parent below which a version rolls back")
    poll_seconds: float = Field(1.0, gt=0, description="API processes poll the registry this often")
    failpoints: str = Field(
        "",
        description="fault injection for tests and drills, 'point=action,…' (e.g. "
        "'after_publish=kill,in_publish=sleep:5'; workers/failpoints.py); empty: none",
    )

    cors_origins: str = Field(
        "",
        description="comma-separated origins allowed to call the API from a browser"
        " (sites embedding /widget.js); empty: same origin only",
    )

    flower_port: int = 5555

    # --- serving fault bounds
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="a chat request not finished within this many seconds "
        "is cancelled and answered 503 (engine_timeout); bounds every wait on the engine",
    )
    smoke_test_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a loaded policy must answer its smoke test within "
        "this many seconds, else it is refused like a corrupt checkpoint",
    )

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        # a glob character would make the prefix's SCAN/KEYS patterns (operators' cleanup) match other deployments
        if not v or any(c.isspace() or c in "*?[]" for c in v):
            raise ValueError(f"ALIGND_KEY_PREFIX {v!r} must be non-empty, without spaces or glob characters (*?[])")
        return v

    @field_validator("home", "checkpoint_root")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        return None if v is None else v.expanduser().resolve()

    @model_validator(mode="after")
    def _refuse_unsafe_in_production(self) -> Settings:
        self.key_grants()  # a malformed ALIGND_API_KEYS fails at start, not at the first request
        if self.env == "production" and self.failpoints:
            raise ValueError("ALIGND_FAILPOINTS injects faults for tests and drills: it is refused in production")
        if self.env == "production":
            for name in ("api_keys", "admin_key"):
                value = getattr(self, name)
                if not value or "changethis" in value:
                    raise ValueError(f"ALIGND_{name.upper()} must be set to a real secret when ALIGND_ENV=production")
        return self

    def key_grants(self) -> dict[str, KeyGrant]:
        """Map of API key → what it may do, parsed from `api_keys` ('key1:alice,key2:alice:feedback,…')."""
        return dict(parse_key_entry(item.strip()) for item in (self.api_keys or "").split(",") if item.strip())

    def user_keys(self) -> dict[str, str]:
        """Map of API key → user id parsed from `api_keys` ('key1:alice,key2:bob')."""
        return {key: grant.user for key, grant in self.key_grants().items()}

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def checkpoints_dir(self) -> Path:
        return self.checkpoint_root or self.home / "checkpoints"

    def stored_path(self, path: str | Path) -> str:
        """How the registry keeps a checkpoint folder: relative to the checkpoint root, so that a home restored from a
        backup, moved, or mounted at another path (a container volume) still finds its versions."""
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.checkpoints_dir))
        except ValueError:  # a folder outside the root: its absolute path, which `checkpoint` refuses to open
            return str(path)

    def checkpoint(self, stored: str | Path) -> Path:
        """The folder a registry path names (see `stored_path`), confined to the checkpoint root: a path that leads
        out of it (`..`, an absolute path elsewhere, a symlink pointing out) is refused (ValueError), whoever wrote it
        into the registry, because the folder is loaded as a model (pickled tokenizer files, code) and gc deletes
        it. An absolute path is what a registry written with absolute paths holds: inside the root it is used as it
        is; outside it, the root's folder of the same name is used when there is one (the home moved)."""
        p = Path(stored)
        root = self.checkpoints_dir.resolve()
        if p.is_absolute() and p.name and not p.resolve().is_relative_to(root) and (root / p.name).is_dir():
            p = Path(p.name)
        target = p if p.is_absolute() else self.checkpoints_dir / p
        if not target.resolve().is_relative_to(root):
            raise ValueError(f"registry path {str(stored)!r} leaves the checkpoint root {root}: refused")
        return target

    def apply_torch_threads(self, serving: bool = False) -> int | None:
        """ALIGND_TORCH_THREADS, else every core, for training: set on the calling thread, and returned. On a GPU
        (ALIGND_DEVICE=cuda…) nothing is pinned unless ALIGND_TORCH_THREADS says so: the CPU threads there only
        launch kernels (returns None).

        Serving (`serving=True`): the calling thread, and the threads that load versions, run torch on one thread;
        the engine's thread gets `serving_threads(parameters)` once the model is loaded (`Engine(threads=…)`).
        libgomp keeps a pool of worker threads for each thread that runs a parallel torch op, and once a process
        holds more of them than there are cores it cuts their spin-wait to ~100 iterations, so each of the hundreds
        of parallel regions in a decode step pays a futex wake-up: a 135 M decode step of 16 rows on a thread of its
        own took 88-104 ms beside the main thread's pool and 75-86 ms without it (`python bench/engine_step.py`, 2
        cores, 2 threads each; medians of two runs). Returns None then."""
        from core.threads import set_thread_torch_threads

        if self.torch_device().startswith("cuda") and self.torch_threads is None:
            return None
        if serving:
            set_thread_torch_threads(1)
            return None
        return set_thread_torch_threads(self.torch_threads or os.cpu_count() or 1)

    def serving_threads(self, parameters: int) -> int | None:
        """The engine thread's torch threads for a served model of `parameters` parameters (None: leave torch's own
        count, on a GPU): ALIGND_TORCH_THREADS, else the cores shared by the `serve_workers` API processes — less one
        for the event loop (HTTP, JSON, streaming) when the model is small enough that each token costs the server
        about as much as the decode step (ENGINE_ALL_CORES_MIN_PARAMETERS says what was measured)."""
        if self.torch_device().startswith("cuda") and self.torch_threads is None:
            return None
        if self.torch_threads:
            return self.torch_threads
        cores = os.cpu_count() or 1
        spare = 0 if parameters >= ENGINE_ALL_CORES_MIN_PARAMETERS else 1
        return max(1, (cores - spare) // self.serve_workers)

    def shared_machine_threads(self) -> int | None:
        """The torch threads of each of the API and the training worker when one machine runs both (`alignd up`,
        `alignd demo`): half the cores each, unless ALIGND_TORCH_THREADS is set (that count then applies to each) or
        the work runs on a GPU (None for both). Two processes that each claim every core ruin each other: at the 135 M
        shape on 2 cores (`python bench/colocate.py --train-threads T --server-threads S`), with two threads each a
        training step beside `alignd serve` under 16 clients took 15.8 s (4.0 alone) and the API served 43 tokens/s
        (314 alone); with one each, 5.9 s (5.7 alone) and 277 tokens/s (295 alone); with two for training and one
        for serving, 6.9 s (3.9) and 183 tokens/s (274). With `share_cores=follow` the API keeps this count and the
        training worker widens to every core while the API is idle (`training_threads_follow`)."""
        if self.torch_threads or self.torch_device().startswith("cuda"):
            return None
        return max(1, (os.cpu_count() or 2) // 2)

    def training_threads_follow(self) -> tuple[int, int] | None:
        """(wide, narrow): a training cycle's torch threads while the API processes of this home are idle and while
        one has requests in flight (core/threads.py follow_load), or None where the count is fixed (`share_cores`
        split, ALIGND_TORCH_THREADS set, a GPU). A worker whose home has no API process never narrows."""
        if self.share_cores != "follow" or self.torch_threads or self.torch_device().startswith("cuda"):
            return None
        cores = os.cpu_count() or 1
        return cores, max(1, cores // 2)

    def serving_engine(self, parameters: int | None = None) -> Literal["builtin", "vllm"]:
        """The engine `engine` names, with `auto` resolved (VLLM_AUTO_RULE) for a model of `parameters` parameters
        (None: not known yet, so only a GPU decides)."""
        if self.engine != "auto":
            return self.engine
        if not (self.vllm_url or self.vllm_python):
            return "builtin"
        if self.torch_device().startswith("cuda"):
            return "vllm"
        return "vllm" if parameters is not None and parameters >= VLLM_MIN_PARAMETERS else "builtin"

    def bootstrap_arch(self) -> str:
        """The built-in assistant's architecture (`builtin_arch`, auto resolved)."""
        if self.builtin_arch != "auto":
            return self.builtin_arch
        return "llama" if self.serving_engine() == "vllm" else "gpt2"

    def torch_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def serving_dtype(self, parameters: int, device: str | None = None):
        """The torch dtype a served model of `parameters` parameters runs in on `device` (see `dtype`)."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        device = device or self.torch_device()
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return torch.bfloat16 if native_bf16 and parameters >= BF16_MIN_PARAMETERS else torch.float32

    def serving_quantize(self, parameters: int, dtype, device: str | None = None) -> str:
        """ "int8" or "none" for a served model of `parameters` parameters in torch dtype `dtype` (see `quantize`)."""
        import torch

        if self.quantize != "auto":
            return self.quantize
        on_cpu = (device or self.torch_device()) == "cpu"
        return "int8" if on_cpu and dtype == torch.bfloat16 and parameters >= BF16_MIN_PARAMETERS else "none"


@functools.cache
def get_settings() -> Settings:
    return Settings()
