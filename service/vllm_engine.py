"""The vLLM engine: alignd's engine interface over one vLLM OpenAI server (`ALIGND_ENGINE=vllm`).

The chat route, the completion record, feedback, arena and metrics do not know which engine runs: this class offers
what service/engine.py's `Engine` offers (`submit` → a `Handle` of events, `cancel`, `swap`, `add_policy`, `pin`,
`loaded_versions`, `current`) and turns each sequence into one streamed `POST /v1/completions` of vLLM. The prompt
goes as token ids, encoded by alignd's own chat template, so vLLM decodes exactly the prompt alignd's engine would.

Versions are vLLM model names: the base (SFT) version is the model vLLM was started on; a LoRA version N is the
adapter `alignd-vN`, registered with `POST /v1/load_lora_adapter` after alignd checked its manifest and base digest
(service/loader.py) and smoke-tested through vLLM before any request uses it. Versioned names rather than a same-name
reload: vLLM's in-place reload re-reads the adapter on every step and can serve stale prefix-cache blocks. An old
version's adapter is unloaded once its requests drained (and, when several API processes share the vLLM server, once
`request_timeout_s` has passed since it left service, which bounds any process's request on it).

A sequence whose client leaves is cancelled by closing its HTTP stream: vLLM aborts a request whose connection closes.
While vLLM does not answer, requests get an "error" event with code `engine_unavailable` (the API answers 503 with
`Retry-After`); a health check every `HEALTH_INTERVAL_S` notices its return and registers the adapters again (a
restarted vLLM has forgotten them) before requests go to it again.

httpx in a thread of its own with its own event loop: callers are the API's event loop, the registry follower's thread
and synchronous tools (smoke tests, benchmarks), and one loop serves them all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerBase

from service.engine import Event, Handle, SamplingParams

log = logging.getLogger("alignd.vllm")

HEALTH_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 3.0
ADMIN_TIMEOUT_S = 120.0  # adapter load/unload: a large adapter on a busy server takes seconds
# vLLM's Prometheus names (v1 engine) → the gauges alignd re-exports for ops (service/metrics.py)
VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def adapter_name(version: int) -> str:
    return f"alignd-v{version}"


@dataclass
class ServedVersion:
    """A policy version as vLLM serves it: its model name there, and alignd's tokenizer for its prompts."""

    version: int
    model: str  # the vLLM model name: the base's served name or `alignd-vN`
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    context: int
    path: str = ""
    adapter: bool = False

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class VLLMUnavailable(RuntimeError):
    """The vLLM server did not answer."""


class VLLMEngine:
    """alignd's engine interface over a vLLM OpenAI server at `url` (module docstring)."""

    kind = "vllm"

    def __init__(self, url: str, base: ServedVersion, *, exclusive: bool, drain_grace_s: float, path_map=None):
        self.url = url.rstrip("/")
        self.base = base  # the model vLLM was started on, as version `base.version`
        self.exclusive = exclusive  # only this process uses the server: adapters unload as soon as they drain
        self.drain_grace_s = drain_grace_s
        self.path_map = path_map or (lambda p: str(p))  # a checkpoint folder as the vLLM server sees it
        self.base_digest = ""  # training.lora.folder_digest of the base: an adapter must name it (service/loader.py)
        self.server = None  # a ManagedVLLM this engine owns and stops with itself
        self.policies: dict[int, ServedVersion] = {base.version: base}
        self.current_version = base.version
        self.pinned: set[int] = set()
        self.healthy = False
        self.health_error = "not checked yet"
        self.adapters: dict[str, str] = {}  # name → path as registered in vLLM (again after a restart)
        self.cancelled = 0
        self.failed = 0
        self._inflight: Counter[int] = Counter()
        self._retired: dict[int, float] = {}  # version → when it left service (current, pinned)
        self._futures: dict[int, Future] = {}  # id(handle) → its request
        # events of every stream, delivered once per turn of the engine's loop: one wake-up of each caller's loop
        # per turn rather than one per token per stream (Handle.push_all), as alignd's engine does per decode step
        self._outbox: list[tuple[Handle, Event]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        self._thread: threading.Thread | None = None
        self._health_task: asyncio.Task | None = None

    # --- lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop.run_forever, name="alignd-vllm", daemon=True)
        self._thread.start()
        self._call(self._open())

    async def _open(self) -> None:
        # no connection cap: each running sequence holds one stream, and vLLM's scheduler is the queue
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=None, write=30.0, pool=None)
        self._client = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=timeout)
        await self._check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return

        async def close() -> None:
            if self._health_task is not None:
                self._health_task.cancel()
            for fut in list(self._futures.values()):
                fut.cancel()
            await self._client.aclose()

        try:
            self._call(close(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout)
            self._thread = None
            if self.server is not None:
                self.server.stop()

    def _call(self, coro, timeout: float | None = ADMIN_TIMEOUT_S):
        """Run `coro` on the engine's loop from another thread and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- versions (any thread)
    @property
    def current(self) -> ServedVersion:
        return self.policies[self.current_version]

    def swap(self, policy: ServedVersion) -> None:
        with self._lock:
            old = self.current_version
            self.policies[policy.version] = policy
            self.current_version = policy.version
            self._retired.pop(policy.version, None)
            if old != policy.version and old not in self.pinned:
                self._retired.setdefault(old, time.monotonic())

    def add_policy(self, policy: ServedVersion) -> None:
        with self._lock:
            self.policies[policy.version] = policy
            self._retired.pop(policy.version, None)

    def pin(self, versions: set[int]) -> None:
        with self._lock:
            for v in self.pinned - set(versions):
                if v != self.current_version:
                    self._retired.setdefault(v, time.monotonic())
            self.pinned = set(versions)

    def loaded_versions(self) -> list[int]:
        with self._lock:
            return sorted(self.policies)

    def running(self) -> int:
        with self._lock:
            return sum(self._inflight.values())

    def load_adapter(self, version: int, path: str | Path) -> str:
        """Register version `version`'s adapter folder in vLLM as `alignd-vN`; returns the name."""
        name = adapter_name(version)
        self._call(self._register(name, self.path_map(path)))
        return name

    def unload_adapter(self, name: str) -> None:
        self._call(self._unregister(name))

    async def _register(self, name: str, path: str) -> None:
        resp = await self._client.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=ADMIN_TIMEOUT_S
        )
        # "already been loaded": another API process sharing this server registered it first; same name, same folder
        if resp.status_code != 200 and "already been loaded" not in resp.text:
            raise RuntimeError(f"vLLM refused adapter {name} ({path}): {resp.status_code} {_message(resp.text)}")
        self.adapters[name] = path

    async def _unregister(self, name: str) -> None:
        self.adapters.pop(name, None)
        try:
            await self._client.post("/v1/unload_lora_adapter", json={"lora_name": name}, timeout=ADMIN_TIMEOUT_S)
        except httpx.HTTPError as exc:  # it is gone with a dead server anyway
            log.warning("unloading %s: %s", name, exc)

    # --- requests (any thread)
    def submit(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        version: int | None = None,
        policy: ServedVersion | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        prompt_ids: list[int] | None = None,
        stream: bool = True,
    ) -> Handle:
        """Start one sequence on `policy`, else `version` if loaded, else the current version (as `Engine.submit`).
        `stream=False` asks vLLM for the whole text at once: fewer events for a caller that waits for the end."""
        with self._lock:
            if policy is None:
                policy = self.policies.get(version) if version is not None else None
                policy = policy or self.policies[self.current_version]
            self._inflight[policy.version] += 1
        handle = Handle(loop)
        ids = prompt_ids if prompt_ids is not None else policy.encode_chat(messages)
        handle.version, handle.prompt_tokens = policy.version, len(ids)
        fut = asyncio.run_coroutine_threadsafe(self._generate(handle, policy, ids, params, stream), self._loop)
        self._futures[id(handle)] = fut
        return handle

    def generate(self, messages, params: SamplingParams, version: int | None = None, timeout: float | None = None):
        """Synchronous convenience, as `Engine.generate`: (text, finish_reason, completion_tokens)."""
        handle = self.submit(messages, params, version=version, stream=False)
        try:
            return handle.wait(timeout)
        except TimeoutError:
            self.cancel(handle)
            raise

    def cancel(self, handle: Handle) -> None:
        """Abort `handle`'s vLLM request (its stream is closed; vLLM aborts it). Thread-safe and idempotent."""
        handle.cancelled = True
        fut = self._futures.get(id(handle))
        if fut is not None:
            fut.cancel()

    def _body(self, policy: ServedVersion, ids: list[int], params: SamplingParams, stream: bool) -> dict:
        body = {
            "model": policy.model,
            "prompt": ids,
            # as alignd's engine: a sequence stops at the context's end rather than failing
            "max_tokens": min(params.max_tokens, max(1, policy.context - len(ids))),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": stream,
            "return_token_ids": True,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def _generate(self, handle: Handle, policy: ServedVersion, ids, params: SamplingParams, stream: bool):
        try:
            if not self.healthy:
                raise VLLMUnavailable(self.health_error)
            result = await self._request(handle, policy, ids, params, stream)
            if result is None and policy.adapter and self.healthy:  # the server lost the adapter: register, retry
                await self._register(policy.model, self.path_map(policy.path))
                result = await self._request(handle, policy, ids, params, stream)
            if result is None:
                raise RuntimeError(f"vLLM does not know the model {policy.model}")
            finish, tokens = result
            self._emit(handle, Event("done", finish_reason=finish, tokens=tokens))
        except asyncio.CancelledError:
            self.cancelled += 1
            self._emit(handle, Event("done", finish_reason="cancelled", tokens=len(handle.token_ids)))
        except (httpx.HTTPError, VLLMUnavailable) as exc:
            self.failed += 1
            if not isinstance(exc, VLLMUnavailable):
                self._mark_down(f"{type(exc).__name__}: {exc}")
            message = f"the vLLM server is unavailable ({self.health_error}); retry shortly"
            self._emit(handle, Event("error", message, code="engine_unavailable"))
        except Exception as exc:  # an answer we cannot use: this request fails, the others carry on
            self.failed += 1
            log.error("vLLM request failed: %s: %s", type(exc).__name__, exc)
            self._emit(handle, Event("error", f"generation failed in vLLM: {exc}"))
        finally:
            self._futures.pop(id(handle), None)
            with self._lock:
                self._inflight[policy.version] -= 1
                if self._inflight[policy.version] <= 0:
                    del self._inflight[policy.version]

    async def _request(self, handle: Handle, policy: ServedVersion, ids, params, stream: bool):
        """One completion request; (finish_reason, completion tokens), or None when vLLM does not know the model."""
        body = self._body(policy, ids, params, stream)
        async with self._client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                if resp.status_code == 404:
                    return None
                raise RuntimeError(f"vLLM answered {resp.status_code}: {_message(text)}")
            if not stream:
                data = json.loads(await resp.aread())
                choice = data["choices"][0]
                self._take(handle, choice)
                return choice.get("finish_reason") or "stop", data["usage"]["completion_tokens"]
            finish, tokens = "stop", 0
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    raise RuntimeError(_message(payload))
                for choice in data.get("choices") or ():
                    self._take(handle, choice)
                    finish = choice.get("finish_reason") or finish
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
            return finish, tokens

    def _take(self, handle: Handle, choice: dict) -> None:
        handle.token_ids.extend(choice.get("token_ids") or ())
        text = choice.get("text")
        if text:
            if handle.first_token_at is None:
                handle.first_token_at = time.monotonic()
            self._emit(handle, Event("delta", text))

    def _emit(self, handle: Handle, event: Event) -> None:
        """Queue `event` for this turn's delivery (the engine's loop only)."""
        if not self._outbox:
            self._loop.call_soon(self._flush)
        self._outbox.append((handle, event))

    def _flush(self) -> None:
        items, self._outbox = self._outbox, []
        Handle.push_all(items)

    # --- health, drained adapters, metrics (the engine's loop)
    def _mark_down(self, reason: str) -> None:
        if self.healthy:
            log.error("vLLM at %s is unavailable: %s", self.url, reason)
        self.healthy, self.health_error = False, reason

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:
                await self._check_health()
                await self._unload_drained()
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("vLLM health check: %s: %s", type(exc).__name__, exc)

    async def _check_health(self) -> None:
        try:
            resp = await self._client.get("/health", timeout=CONNECT_TIMEOUT_S)
            ok = resp.status_code == 200
            reason = "" if ok else f"/health answered {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if not ok:
            self._mark_down(f"{self.url} does not answer ({reason})")
            return
        if not self.healthy:  # back (or first seen): a restarted server has forgotten its adapters
            for name, path in list(self.adapters.items()):
                await self._register(name, path)
            log.info("vLLM at %s is serving (%d adapters registered)", self.url, len(self.adapters))
            self.healthy, self.health_error = True, ""

    async def _unload_drained(self) -> None:
        now = time.monotonic()
        with self._lock:
            keep = {self.current_version} | self.pinned
            done = [
                v
                for v, since in self._retired.items()
                if v not in keep
                and not self._inflight.get(v)
                and (self.exclusive or now - since >= self.drain_grace_s)
            ]
            released = [self.policies.pop(v) for v in done if v in self.policies]
            for v in done:
                self._retired.pop(v, None)
        for policy in released:
            if policy.adapter:
                await self._unregister(policy.model)
            log.info("released policy version %s", policy.version)

    def scrape(self) -> dict[str, float]:
        """vLLM's own gauges that ops need (running and waiting requests, KV-cache use), read now."""
        try:
            text = self._call(self._client.get("/metrics", timeout=CONNECT_TIMEOUT_S), timeout=5).text
        except Exception:
            return {}
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = VLLM_GAUGES.get(sample.name)
                if key is not None:
                    out[key] = out.get(key, 0.0) + sample.value
        return out


def _message(text: str) -> str:
    """The message of a vLLM error body (OpenAI shape), else the text."""
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:500]
