"""The generation engine: continuous batching over a KV cache, per-request sampling, versions and hot-swap.

One scheduler thread owns the models. Requests join a running batch between decode steps (their prompts are
prefilled as a batch, then their KV cache is left-padded and concatenated onto the running one) and leave it as soon as
they finish, so 16 concurrent clients share one forward pass per token instead of queueing behind each other. Each
sequence is pinned to the policy version it started on; a `swap` makes new requests use the new version while the old
version's sequences drain, after which its weights are dropped.

Why a scheduler of our own rather than transformers' continuous-batching API (`generate_batch` / paged attention):
measured on these 2-core CPUs with alignd's model, see `bench/serve.py` (it runs both) and the README; ours also
gives per-request seeds, stop strings, streaming and version pinning, which the HF manager does not expose together.

Faults are contained per step: an exception in the prefill of a group of new sequences fails those sequences only,
one in a version's sampling or decode step fails that version's running batch only (its KV cache may be half
updated); each affected caller gets an "error" event and every other batch, and every later request, is served as
before. `cancel(handle)` drops a sequence whose client went away before the next decode step (a queued one never
starts), the way vLLM aborts requests, so a disconnected client stops costing forward passes at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from core.threads import set_thread_torch_threads
from service import metrics
from training.lora import load_policy

log = logging.getLogger("alignd.engine")

IDLE_WAIT_S = 0.05  # how long the idle scheduler blocks waiting for work before re-checking swaps


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Policy:
    """A loaded policy version: model + tokenizer, as served."""

    version: int
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: str = ""
    context: int = 512
    compiled: Callable | None = field(default=None, repr=False)  # torch.compile of the model (`prepared`)
    # the model with int8 decode layers (`prepared`, service/quantize.py): a copy sharing every tensor with `model`,
    # which stays as loaded for whoever reuses it (a base cache merges later adapters into it)
    fast: torch.nn.Module | None = field(default=None, repr=False)
    fast_ready: threading.Event = field(default_factory=threading.Event, repr=False)  # set once `fast` is decided
    # the forward can compute the LM head for the last position only (transformers' `logits_to_keep`): a prefill
    # then skips (prompt length - 1) x vocab of output, at 49k vocab costlier than several decode steps
    last_logits_only: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.last_logits_only = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    @classmethod
    def load(
        cls,
        version: int,
        path: str | Path,
        device: str = "cpu",
        resolve_base=None,
        base_cache=None,
        dtype=None,
        compile: bool = False,
        quantize="none",
        quantize_in_background: bool = False,
    ) -> Policy:
        """A full checkpoint, or an adapter merged into a copy of its base (found with `resolve_base`, the
        registry's path rule; kept in memory by `base_cache`; training/lora.py), so an adapter version decodes at the
        base's speed. `dtype` is a torch dtype, or a function of the parameter count giving one (the settings' `auto`
        rule), applied after loading (and after an adapter is merged); then `quantize`: "none", "int8", or a function
        of the parameter count and the dtype giving one of them (the settings' `auto` rule). With
        `quantize_in_background` (the API's hot swap) the int8 copy is built by a thread while the policy is
        smoke-tested and starts serving: quantizing every linear weight of a 135 M model takes ~0.5 s of one core,
        half the swap budget; until it is ready, decode steps run on the loaded weights."""
        model, tokenizer = load_policy(path, device, resolve_base=resolve_base, base_cache=base_cache)
        cfg = model.config
        context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 2048
        policy = cls(version=version, model=model, tokenizer=tokenizer, path=str(path), context=int(context))
        parameters = policy.parameters
        if callable(dtype):
            dtype = dtype(parameters)
        if callable(quantize):
            quantize = quantize(parameters, dtype or policy.dtype)
        return policy.prepared(dtype, compile, quantize, background=quantize_in_background)

    def prepared(
        self, dtype: torch.dtype | None = None, compile: bool = False, quantize: str = "none", background: bool = False
    ) -> Policy:
        """Cast the weights to `dtype` (the KV cache follows them; logits are sampled in float32), optionally decode
        small batches with int8 weights (`quantize="int8"`, CPU only: service/quantize.py; with `background`, built
        by a thread that `fast_ready` reports on, unless compiling) and optionally `torch.compile` the forward.
        `dynamic=True`: the batch and the cache length change every step, and one graph over symbolic sizes
        recompiles far less than one per shape."""
        if dtype is not None and dtype != self.dtype:
            # new Parameter objects, not the old ones converted in place: an adapter version shares every tensor
            # but its merged weights with the cached base (training/lora.py merged_copy), which must stay as it is
            torch.__future__.set_overwrite_module_params_on_conversion(True)
            try:
                self.model.to(dtype)
            finally:
                torch.__future__.set_overwrite_module_params_on_conversion(False)
        if quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be 'none' or 'int8', not {quantize!r}")
        if quantize == "none" or self.device.type != "cpu":  # the kernel and its measurements are CPU ones
            self.fast_ready.set()
        elif background and not compile:  # a compiled forward is built once, from the int8 copy
            name = f"alignd-int8-v{self.version}"
            threading.Thread(target=self._build_fast, kwargs={"background": True}, name=name, daemon=True).start()
        else:
            self._build_fast(raise_errors=True)
        if compile:  # kept beside the model, not patched into it: a base cache deep-copies the model
            self.compiled = torch.compile((self.fast or self.model).forward, dynamic=True)
        return self

    def _build_fast(self, raise_errors: bool = False, background: bool = False) -> None:
        """The int8 copy (service/quantize.py); `forward` switches to it between two steps once it exists (both
        compute the same function up to int8 rounding). In a background build a failure leaves the policy serving
        as loaded."""
        from service.quantize import int8_decode_copy

        if background:  # no thread pool beside the engine's (core/config.py apply_torch_threads)
            set_thread_torch_threads(1)
        try:
            self.fast, replaced = int8_decode_copy(self.model)
            log.info("policy v%d: %d linear layers decode in int8", self.version, replaced)
        except Exception:
            if raise_errors:
                raise
            log.exception("policy v%d: no int8 copy; decoding with the loaded weights", self.version)
        finally:
            self.fast_ready.set()

    def forward(self, **inputs):
        return (self.compiled or self.fast or self.model)(**inputs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    tokens: int = 0
    code: str = "engine_error"  # of an "error": what the API answers (engine_error, engine_timeout)


class EngineError(RuntimeError):
    """Generation of a sequence failed in the engine (its prefill, sampling or decode step raised)."""


class Handle:
    """The caller's side of one sequence: events arrive from the scheduler thread, thread-safely."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None):
        self.loop = loop
        self.aqueue: asyncio.Queue[Event] | None = asyncio.Queue() if loop else None
        self.squeue: queue.Queue[Event] | None = None if loop else queue.Queue()
        self.version = 0
        self.prompt_tokens = 0
        self.first_token_at: float | None = None
        self.cancelled = False  # set by Engine.cancel from any thread; read by the scheduler between steps
        self.token_ids: list[int] = []  # the completion's token ids (eos excluded), set when it is done

    def push(self, event: Event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.aqueue.put_nowait, event)
        else:
            self.squeue.put(event)

    @staticmethod
    def push_all(items: list[tuple[Handle, Event]]) -> None:
        """Deliver one decode step's events with one wake-up per event loop rather than one per token: at 16
        streaming clients that is 16x fewer cross-thread calls into the server's loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, Event]]] = {}
        for handle, event in items:
            if handle.loop is None:
                handle.squeue.put(event)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, event))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_batch, batch)

    async def events(self) -> AsyncIterator[Event]:
        """The events in order; deltas that queued up while the consumer was busy come out merged into one."""
        while True:
            event = await self.aqueue.get()
            while event.kind == "delta" and not self.aqueue.empty():
                nxt = self.aqueue.get_nowait()
                if nxt.kind != "delta":
                    yield event
                    event = nxt
                    break
                event = Event("delta", event.text + nxt.text)
            yield event
            if event.kind != "delta":
                return

    def wait(self, timeout: float | None = None) -> tuple[str, str, int]:
        """Block until done (sync callers): (text, finish_reason, completion_tokens). Raises EngineError when
        generation failed and TimeoutError when it is not done within `timeout` seconds (the caller should then
        `Engine.cancel` it)."""
        parts = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                event = self.squeue.get(timeout=left)
            except queue.Empty:
                raise TimeoutError(f"generation did not finish within {timeout} s") from None
            if event.kind == "delta":
                parts.append(event.text)
            elif event.kind == "error":
                raise EngineError(event.text)
            else:
                return "".join(parts), event.finish_reason or "stop", event.tokens


def _put_batch(batch: list[tuple[Handle, Event]]) -> None:
    for handle, event in batch:
        handle.aqueue.put_nowait(event)


class _Seq:
    """Scheduler-side state of one sequence."""

    __slots__ = (
        "handle",
        "prompt_ids",
        "params",
        "generator",
        "out_ids",
        "text",
        "emitted",
        "prefix_offset",
        "read_offset",
        "policy",
        "max_new",
    )

    def __init__(self, handle: Handle, prompt_ids: list[int], params: SamplingParams, policy: Policy):
        self.handle, self.prompt_ids, self.params, self.policy = handle, prompt_ids, params, policy
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=policy.device)
            self.generator.manual_seed(params.seed)
        self.out_ids: list[int] = []
        self.text = ""  # the decoded output up to its last complete character
        self.emitted = 0  # characters of `text` already sent to the caller
        # incremental detokenisation (vLLM's): out_ids[prefix_offset:read_offset] is already in `text` and decoded
        # again only as left context (SentencePiece-style decoders render a piece by its neighbour)
        self.prefix_offset = self.read_offset = 0
        self.max_new = min(params.max_tokens, max(1, policy.context - len(prompt_ids)))

    def add_token(self, token: int, tok: PreTrainedTokenizerBase) -> None:
        """Append `token` and the text it completes. Decodes a window of a few tokens rather than the whole output,
        so a step costs the same at the 500th token as at the first."""
        self.out_ids.append(token)
        new = tok.decode(self.out_ids[self.prefix_offset :], skip_special_tokens=True)
        if new.endswith("\ufffd"):  # a partial UTF-8 character: wait for the rest of its bytes
            return
        prefix = tok.decode(self.out_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        if len(new) > len(prefix):
            self.text += new[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.out_ids)

    def flush(self, tok: PreTrainedTokenizerBase) -> None:
        """At the end: the bytes still waiting for the rest of a character, as the replacement character."""
        if self.read_offset < len(self.out_ids):
            new = tok.decode(self.out_ids[self.prefix_offset :], skip_special_tokens=True)
            prefix = tok.decode(self.out_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
            self.text += new[len(prefix) :]
            self.prefix_offset = self.read_offset = len(self.out_ids)


class _Batch:
    """The running batch of one policy version: its sequences, KV cache and attention mask."""

    def __init__(self, policy: Policy):
        self.policy = policy
        self.seqs: list[_Seq] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, T) 1 = real token, over cache + next token
        self.positions: torch.Tensor | None = None  # (B,) position id of each row's next token
        self.next_logits: torch.Tensor | None = None  # (B, V) logits for each row's next token


class Engine:
    """Continuous-batching generation over one or more policy versions."""

    kind = "builtin"

    def __init__(self, policy: Policy, max_batch_size: int = 32, threads: int | None = None):
        self.max_batch_size = max_batch_size
        self.threads = threads  # torch threads of the engine's own thread (None: whatever the process has set)
        self.torch_threads = 0  # the count its decode steps really run on, read by each (a metric; 0 before the first)
        self.policies: dict[int, Policy] = {policy.version: policy}
        self.current_version = policy.version
        self.pinned: set[int] = set()  # versions kept loaded besides the current one (arena parent)
        self._pending: queue.Queue[_Seq] = queue.Queue()
        self._batches: dict[int, _Batch] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0
        self.prefills = 0  # prefill forwards, each over a group of sequences admitted together
        self.tokens_generated = 0
        self.cancelled = 0  # sequences dropped by `cancel` before they finished
        self.failed = 0  # sequences failed by an exception in the engine
        self._cancel_requested = threading.Event()  # a hint that rows may need dropping before the next step
        self.on_step = None  # optional callback(batch_size) for metrics
        self.on_busy = None  # optional callback(bool): sequences in flight or not, at each scheduler turn (a training
        #                      worker on the same machine narrows while they are: core/threads.py BusyFlag)

    # --- public API (any thread)
    def start(self) -> None:
        if self._thread is None:
            self._running = True
            self._thread = threading.Thread(target=self._loop, name="alignd-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(timeout=timeout)  # a forward stuck in native code cannot be interrupted: give up on it
            self._thread = None

    @property
    def current(self) -> Policy:
        return self.policies[self.current_version]

    def submit(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        *,
        version: int | None = None,
        policy: Policy | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        prompt_ids: list[int] | None = None,
        stream: bool = True,
    ) -> Handle:
        """Queue one sequence and return its handle at once. It runs on `policy` if given (a caller that read
        `current` earlier keeps that version even if a swap released it meanwhile), else on `version` if still
        loaded, else on the current version; `handle.version` says which. `stream` is the engine interface's hint
        that the caller waits for the end (service/vllm_engine.py uses it); this engine emits per token either way."""
        with self._lock:
            if policy is None:
                policy = self.policies.get(version) if version is not None else None
                policy = policy or self.policies[self.current_version]
        handle = Handle(loop)
        ids = prompt_ids if prompt_ids is not None else policy.encode_chat(messages)
        handle.version, handle.prompt_tokens = policy.version, len(ids)
        self._pending.put(_Seq(handle, ids, params, policy))
        return handle

    def generate(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        version: int | None = None,
        timeout: float | None = None,
    ) -> tuple[str, str, int]:
        """Synchronous convenience: (text, finish_reason, completion_tokens); raises EngineError or TimeoutError
        (the sequence is cancelled then)."""
        handle = self.submit(messages, params, version=version)
        try:
            return handle.wait(timeout)
        except TimeoutError:
            self.cancel(handle)
            raise

    def cancel(self, handle: Handle) -> None:
        """Stop generating for `handle` (its client went away). Thread-safe and idempotent: the scheduler drops the
        row before its next decode step, a queued sequence never starts, a finished one is not affected."""
        handle.cancelled = True
        self._cancel_requested.set()

    def running(self) -> int:
        """Sequences in a running batch now (queued ones not counted)."""
        return sum(len(b.seqs) for b in list(self._batches.values()))

    def swap(self, policy: Policy) -> None:
        """Make `policy` current. Sequences already running finish on their version; new ones use this one."""
        with self._lock:
            self.policies[policy.version] = policy
            self.current_version = policy.version

    def loaded_versions(self) -> list[int]:
        with self._lock:
            return sorted(self.policies)

    def pin(self, versions: set[int]) -> None:
        with self._lock:
            self.pinned = set(versions)

    def add_policy(self, policy: Policy) -> None:
        with self._lock:
            self.policies[policy.version] = policy

    # --- scheduler thread
    def _loop(self) -> None:
        if self.threads:  # per thread in torch's OpenMP backend (core/config.py apply_torch_threads says why)
            set_thread_torch_threads(self.threads)
        while self._running:
            try:
                busy = any(b.seqs for b in self._batches.values())
                self._publish_busy(busy)
                self._admit(block=not busy)
                for version in list(self._batches):
                    self._drop_cancelled()  # between steps: a client that left stops costing forwards at once
                    batch = self._batches[version]
                    if not batch.seqs:
                        continue
                    try:
                        self._decode_step(batch)
                    except Exception as exc:  # the batch's cache may be half updated: fail this version's rows only
                        self._fail(batch.seqs, exc, "decode")
                        self._batches.pop(version, None)
                self._release_drained()
            except Exception as exc:  # a bug outside one batch's step: fail what is in flight, keep serving
                self._fail([s for b in self._batches.values() for s in b.seqs], exc, "scheduler")
                self._batches.clear()
        self._publish_busy(False)

    def _publish_busy(self, busy: bool) -> None:
        if self.on_busy is not None:
            try:
                self.on_busy(busy)
            except OSError as exc:  # a full or read-only disk costs the trainer its hint, never a request
                log.warning("engine could not mark itself busy=%s: %s", busy, exc)

    def _fail(self, seqs: list[_Seq], exc: Exception, stage: str) -> None:
        log.error(
            "engine %s failed for %d sequence(s): %s: %s", stage, len(seqs), type(exc).__name__, exc, exc_info=exc
        )
        message = f"generation failed in the engine ({stage}): {type(exc).__name__}: {exc}"
        Handle.push_all([(s.handle, Event("error", message)) for s in seqs])
        self.failed += len(seqs)
        metrics.ENGINE_FAILURES.labels(stage).inc(len(seqs))

    def _drop_cancelled(self) -> None:
        if not self._cancel_requested.is_set():
            return
        self._cancel_requested.clear()  # before the scan: a cancel arriving during it sets it again
        for batch in self._batches.values():
            keep = [i for i, s in enumerate(batch.seqs) if not s.handle.cancelled]
            if len(keep) < len(batch.seqs):
                self._count_cancelled([s for s in batch.seqs if s.handle.cancelled])
                self._select(batch, keep)

    def _count_cancelled(self, seqs: list[_Seq]) -> None:
        # a "done" event ends any consumer still reading (a sync waiter that cancelled after its timeout)
        Handle.push_all([(s.handle, Event("done", finish_reason="cancelled", tokens=len(s.out_ids))) for s in seqs])
        self.cancelled += len(seqs)
        metrics.CANCELLED.inc(len(seqs))

    def _admit(self, block: bool) -> None:
        new: list[_Seq] = []
        room = self.max_batch_size - sum(len(b.seqs) for b in self._batches.values())
        try:
            if block:
                new.append(self._pending.get(timeout=IDLE_WAIT_S))
            while len(new) < max(room, 0):
                new.append(self._pending.get_nowait())
        except queue.Empty:
            pass
        gone = [s for s in new if s.handle.cancelled]
        if gone:  # cancelled while queued: never started
            self._count_cancelled(gone)
            new = [s for s in new if not s.handle.cancelled]
        if not new:
            return
        self._publish_busy(True)  # before the prefill: the mark covers it too
        by_version: dict[int, list[_Seq]] = {}
        for s in new:
            by_version.setdefault(s.policy.version, []).append(s)
        for version, seqs in by_version.items():
            batch = self._batches.get(version)
            if batch is None:
                batch = self._batches[version] = _Batch(seqs[0].policy)
            try:
                prefilled = self._prefill(seqs)
            except Exception as exc:  # only the new sequences have been touched: the running batch carries on
                self._fail(seqs, exc, "prefill")
                continue
            self.prefills += 1
            try:
                self._join(batch, seqs, *prefilled)
            except Exception as exc:  # merging may have left the running cache half extended: fail both
                self._fail(batch.seqs + seqs, exc, "prefill")
                self._batches.pop(version, None)

    @torch.inference_mode()
    def _prefill(self, seqs: list[_Seq]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One forward over the new sequences' prompts: (cache, mask, next positions, next-token logits)."""
        policy = seqs[0].policy
        device = policy.device
        pad = policy.tokenizer.pad_token_id or 0
        width = max(len(s.prompt_ids) for s in seqs)
        # left padding: every row's last prompt token is in the last column; built on the host, copied once
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in seqs]).to(device)
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in seqs]).to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=policy.model.config)
        kw = {"logits_to_keep": 1} if policy.last_logits_only else {}
        out = policy.forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **kw
        )
        logits = out.logits[:, -1, :].float()  # (B, V)
        return cache, mask, mask.sum(-1), logits  # next positions: (B,)

    @torch.inference_mode()
    def _join(
        self,
        batch: _Batch,
        seqs: list[_Seq],
        cache: DynamicCache,
        mask: torch.Tensor,
        next_pos: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:
        if batch.cache is None:
            batch.cache, batch.mask, batch.positions, batch.next_logits = cache, mask, next_pos, logits
        else:
            self._merge(batch, cache, mask, next_pos, logits)
        batch.seqs.extend(seqs)

    @staticmethod
    def _merge(
        batch: _Batch, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, logits: torch.Tensor
    ) -> None:
        """Concatenate a prefilled group onto the running batch, left-padding the shorter cache."""
        t_old, t_new = batch.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def left_pad(x: torch.Tensor, t: int, dim: int) -> torch.Tensor:
            if t == width:
                return x
            shape = list(x.shape)
            shape[dim] = width - t
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old_layer, new_layer in zip(batch.cache.layers, cache.layers, strict=True):
            # keys/values: (B, heads, T, head_dim)
            old_layer.keys = torch.cat([left_pad(old_layer.keys, t_old, 2), left_pad(new_layer.keys, t_new, 2)])
            old_layer.values = torch.cat([left_pad(old_layer.values, t_old, 2), left_pad(new_layer.values, t_new, 2)])
        batch.mask = torch.cat([left_pad(batch.mask, t_old, 1), left_pad(mask, t_new, 1)])
        batch.positions = torch.cat([batch.positions, positions])
        batch.next_logits = torch.cat([batch.next_logits, logits])

    def _sample(self, batch: _Batch) -> torch.Tensor:
        logits = batch.next_logits  # (B, V)
        seqs = batch.seqs
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device)
        greedy = temps <= 0
        if bool(greedy.all()):
            return logits.argmax(-1)
        probs = torch.softmax(logits / temps.clamp(min=1e-5).unsqueeze(1), dim=-1)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=logits.device)
        if bool((top_p < 1).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the first token always survives)
            drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(1)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        # inverse-CDF draw: one uniform per row, placed on the row's cumulative distribution — exact, and one random
        # number per row instead of one per vocabulary entry: the exponential race (argmax p/E) and
        # torch.multinomial both draw a random number per entry: 18-23 ms per step for 16 rows of a 49k vocabulary
        # on this CPU, a fifth of a 135 M decode step, against 4-8 ms here (one row: 1.1-1.2 → 0.2-0.3 ms;
        # python bench/engine_step.py)
        cdf = probs.cumsum(-1)  # (B, V), non-decreasing; unnormalised after top-p, hence scaling by its last column
        u = torch.rand(len(seqs), 1, device=logits.device)
        for i, s in enumerate(seqs):
            if s.generator is not None:  # seeded rows draw from their own generator
                u[i] = torch.rand(1, generator=s.generator, device=logits.device)
        # the first entry whose cdf reaches a target in (0, total] (1 - u: rand can return 0, never 1): a zero-mass
        # token never is one (its cdf equals its predecessor's), and the last entry's cdf is the total, so none is past
        choice = torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(1)
        return torch.where(greedy, logits.argmax(-1), choice)

    @staticmethod
    def _advance(s: _Seq, token: int, eos: int | None, tok: PreTrainedTokenizerBase, outbox: list) -> bool:
        """Take one sampled token into `s`: queue its new text (holding back what may start a stop string) and, if
        it ended the sequence, its "done" event. True when it ended."""
        finish = None
        stops = s.params.stop
        if token == eos:
            finish = "stop"
        else:
            s.add_token(token, tok)
            if len(s.out_ids) >= s.max_new:
                s.flush(tok)
                finish = "length"
            cut = _find_stop(s.text, stops, s.emitted) if stops else None
            if cut is not None:
                s.text, finish = s.text[:cut], "stop"
        end = len(s.text) - (_longest_stop_prefix(s.text, stops) if finish is None and stops else 0)
        if end > s.emitted:
            if s.handle.first_token_at is None:
                s.handle.first_token_at = time.monotonic()
            outbox.append((s.handle, Event("delta", s.text[s.emitted : end])))
            s.emitted = end
        if finish is None:
            return False
        s.handle.token_ids = s.out_ids
        outbox.append((s.handle, Event("done", finish_reason=finish, tokens=len(s.out_ids) + int(token == eos))))
        return True

    @torch.inference_mode()
    def _decode_step(self, batch: _Batch) -> None:
        policy = batch.policy
        tok = policy.tokenizer
        next_ids = self._sample(batch)  # (B,)
        eos = tok.eos_token_id
        outbox: list[tuple[Handle, Event]] = []
        advance = self._advance
        keep = [
            i
            for i, (s, token) in enumerate(zip(batch.seqs, next_ids.tolist(), strict=True))
            if not advance(s, token, eos, tok, outbox)
        ]
        Handle.push_all(outbox)
        self.tokens_generated += len(batch.seqs)
        self.steps += 1
        self.torch_threads = torch.get_num_threads()
        if self.on_step is not None:
            self.on_step(len(batch.seqs))
        if len(keep) < len(batch.seqs):
            self._select(batch, keep)
        if not batch.seqs:
            return
        # one forward for every still-running row: its sampled token at its own position
        ids = (next_ids if len(keep) == len(next_ids) else next_ids[keep]).unsqueeze(1)  # (B, 1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(keep), 1))], dim=1)
        mask = batch.mask
        if policy.model.config._attn_implementation == "sdpa":
            # a ready 4D boolean mask (rows x 1 query x keys) is passed through as is; for one query token per row it
            # is exact, and it skips transformers' per-step mask construction (~10% of a decode step here)
            mask = mask.bool()[:, None, None, :]
        out = policy.forward(
            input_ids=ids,
            attention_mask=mask,
            position_ids=batch.positions.unsqueeze(1),
            cache=batch.cache,
            use_cache=True,
        )  # the cache grows in place
        batch.positions = batch.positions + 1
        batch.next_logits = out.logits[:, -1, :].float()

    @staticmethod
    def _select(batch: _Batch, keep: list[int]) -> None:
        batch.seqs = [batch.seqs[i] for i in keep]
        if not keep:
            batch.cache = batch.mask = batch.positions = batch.next_logits = None
            return
        idx = torch.tensor(keep, device=batch.mask.device)
        mask = batch.mask.index_select(0, idx)
        # drop leading columns that are padding for every remaining row, so the cache does not grow without bound
        first = int((mask.sum(0) > 0).nonzero()[0])
        batch.mask = mask[:, first:]
        for layer in batch.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
            layer.values = layer.values.index_select(0, idx)[:, :, first:]
        batch.positions = batch.positions.index_select(0, idx)
        batch.next_logits = batch.next_logits.index_select(0, idx)

    def _release_drained(self) -> None:
        with self._lock:
            keep = {self.current_version} | self.pinned
            for version in list(self.policies):
                batch = self._batches.get(version)
                if version not in keep and (batch is None or not batch.seqs) and not self._has_pending(version):
                    del self.policies[version]  # the old weights are freed once drained
                    self._batches.pop(version, None)
                    log.info("released policy version %s", version)
            for version in list(self._batches):
                if not self._batches[version].seqs:  # also batches of versions released while a request was queued
                    self._batches.pop(version)

    def _has_pending(self, version: int) -> bool:
        with self._pending.mutex:
            return any(s.policy.version == version for s in self._pending.queue)


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string starts, searching only text that could contain a new match."""
    best = None
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop, max(0, emitted - len(stop) + 1))
        if at != -1 and (best is None or at < best):
            best = at
    return best


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that could start a stop string (held back while streaming)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                best = max(best, k)
                break
    return best
