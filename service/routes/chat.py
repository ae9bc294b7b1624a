"""POST /v1/chat/completions — OpenAI-compatible chat, streaming (SSE) or not, n = 1…4 choices.

Every completion is recorded in Redis (`store.completions`) before the client sees its end, so feedback can refer to
its `id` at once. The policy version is in `system_fingerprint` and the `X-Policy-Version` header. Bodies are the
models of service/schemas.py.

Failures are bounded and answered, never left hanging: an engine error answers 503 `engine_error` (a stream ends
with an OpenAI-style `{"error": {...}}` data line and no `[DONE]`), a request not done within
`settings.request_timeout_s` is cancelled and answered 503 `engine_timeout`, Redis being away answers 503
`redis_unavailable`. A client that disconnects has its sequences cancelled in the engine (the stream generator is
closed by Starlette; a non-streaming request watches its connection while it waits).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse

from service import metrics
from service.admission import Ticket, admission, prompt_limit, requested_tokens, resolve_policy
from service.auth import Caller
from service.deps import AppState, ChatCallerDep, StateDep
from service.engine import Event, Handle, SamplingParams
from service.errors import APIError, error_body, redis_unavailable_message
from service.ratelimit import charge, chat_budgets
from service.schemas import (
    AssistantMessage,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChunkChoice,
    Delta,
    ErrorResponse,
    Usage,
    wire,
)
from store.completions import ChoiceRecord, CompletionRecord, save_completion
from store.feedback import annotator_id

router = APIRouter(prefix="/v1", tags=["chat"])

_RESPONSES = {
    200: {
        "description": "The completion (`application/json`), or with `stream: true` a `text/event-stream` of "
        "`data: <ChatCompletionChunk>` lines ending with `data: [DONE]` (or with one "
        "`data: <ErrorResponse>` line when generation failed)",
        "content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema(mode="serialization")}},
    },
    503: {"model": ErrorResponse, "description": "engine_error, engine_timeout, redis_unavailable or no_policy"},
}


def fingerprint(version: int) -> str:
    return f"alignd-v{version}"


def _choice_versions(state: AppState, n: int) -> tuple[list[int | None], bool]:
    """Versions per choice. In arena mode a two-choice request gets the current and its parent, in random order."""
    pair = state.extras.get("arena_pair")  # (current, parent) when both are loaded; set by the registry follower
    if state.settings.arena and n == 2 and pair:
        versions = list(pair)
        random.shuffle(versions)
        return versions, True
    return [None] * n, False


@dataclass
class _Call:
    """One chat request in flight: what was asked, its engine handles and the deadline that bounds every wait."""

    state: AppState
    user: str
    req: ChatCompletionRequest
    messages: list[dict[str, str]]
    prompt_ids: list[int]
    max_tokens: int
    served: int
    arena: bool
    handles: list[Handle] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)  # choices whose done/error event arrived
    cid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    ticket: Ticket | None = None  # its room in the process (service/admission.py); released when it ends

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Policy-Version": str(self.served)}

    def cancel_unfinished(self) -> None:
        """Free the engine rows of choices still generating (client gone, error in another choice, deadline)."""
        for i, h in enumerate(self.handles):
            if i not in self.finished:
                self.state.engine.cancel(h)

    def arm_deadline(self) -> asyncio.TimerHandle:
        """At the deadline every unfinished choice gets an engine_timeout error event and is cancelled."""
        timeout = self.state.settings.request_timeout_s

        def expire() -> None:
            for i, h in enumerate(self.handles):
                if i not in self.finished:
                    h.push(
                        Event(
                            "error",
                            f"the request did not finish within {timeout:g} s "
                            "(ALIGND_REQUEST_TIMEOUT_S); it was cancelled",
                            code="engine_timeout",
                        )
                    )
            self.cancel_unfinished()

        return asyncio.get_running_loop().call_at(asyncio.get_running_loop().time() + timeout, expire)

    def record(self, texts: list[str], finishes: list[str], n_tokens: int) -> CompletionRecord:
        req = self.req
        return CompletionRecord(
            id=self.cid,
            user=self.user,
            messages=self.messages,
            version=self.served,
            arena=self.arena,
            choices=[
                ChoiceRecord(index=i, text=texts[i], finish_reason=finishes[i], version=h.version)
                for i, h in enumerate(self.handles)
            ],
            params={
                "temperature": req.temperature,
                "top_p": req.top_p,
                "max_tokens": self.max_tokens,
                "stop": req.stop,
                "seed": req.seed,
                "n": req.n,
                "stream": req.stream,
                "client_user": req.user,
            },
            usage={
                "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": n_tokens,
                "total_tokens": len(self.prompt_ids) + n_tokens,
            },
        )

    def observe(self, n_tokens: int) -> None:
        metrics.REQUESTS.labels("ok").inc()
        metrics.TOKENS.labels(str(self.served)).inc(n_tokens)
        metrics.LATENCY.observe(time.monotonic() - self.started)
        firsts = [h.first_token_at for h in self.handles if h.first_token_at]
        if firsts:
            metrics.TTFT.observe(min(firsts) - self.started)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) from every handle until each has ended; marks the ended ones."""
        async for i, ev in _merged(self.handles):
            if ev.kind != "delta":
                self.finished.add(i)
            yield i, ev


async def _merged(handles: list[Handle]) -> AsyncIterator[tuple[int, Event]]:
    if len(handles) == 1:  # the common case needs no fan-in task
        async for ev in handles[0].events():
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(i: int, h: Handle) -> None:
        async for ev in h.events():
            await queue.put((i, ev))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        done = 0
        while done < len(handles):
            i, ev = await queue.get()
            done += ev.kind != "delta"
            yield i, ev
    finally:
        for t in tasks:
            t.cancel()


@router.post("/chat/completions", response_model=ChatCompletionResponse, responses=_RESPONSES)
async def chat_completions(req: ChatCompletionRequest, caller: ChatCallerDep, state: StateDep, request: Request):
    """Generate `n` answers to the conversation; see the module docstring for streaming, errors and cancellation."""
    call = await _start(req, caller, state)
    if req.stream:
        return StreamingResponse(
            _stream(call),
            media_type="text/event-stream",
            headers={**call.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(call, request)


async def _start(req: ChatCompletionRequest, caller: Caller, state: AppState) -> _Call:
    """Admit the request (service/admission.py: in memory, before any other work, so a full server answers at
    once), then check it and submit it; its room is given back if that fails."""
    if state.engine is None:
        raise APIError(
            503, "no policy is loaded yet: run `alignd bootstrap` or wait for the server to start", "no_policy"
        )
    ticket = admission(state).admit(caller.user, req.n, requested_tokens(state.settings, req))
    try:
        return await _submit(req, caller, state, ticket)
    except BaseException:
        ticket.release()
        raise


async def _submit(req: ChatCompletionRequest, caller: Caller, state: AppState, ticket: Ticket) -> _Call:
    """Check the request against the limits and submit its choices to the engine. The completion belongs to the
    key (its user id); the rate limits are per person, (key, `user`), and per key."""
    settings, engine = state.settings, state.engine
    person = annotator_id(caller.user, req.user, is_admin=caller.is_admin)
    default_tokens = min(settings.default_max_tokens, settings.max_new_tokens)
    max_tokens = req.max_completion_tokens or req.max_tokens or default_tokens
    if max_tokens > settings.max_new_tokens:
        raise APIError(422, f"max_tokens must be at most {settings.max_new_tokens}", "invalid_value", "max_tokens")
    messages = [m.model_dump() for m in req.messages]
    policy = resolve_policy(engine, req.model)
    prompt_ids = await run_in_threadpool(policy.encode_chat, messages)
    versions, arena = _choice_versions(state, req.n) if policy is engine.current else ([None] * req.n, False)
    limit = prompt_limit(settings, engine, policy, versions)
    if len(prompt_ids) > limit:
        raise APIError(
            413, f"the prompt has {len(prompt_ids)} tokens; the limit is {limit}", "prompt_too_long", "messages"
        )
    await charge(state.aredis, chat_budgets(settings, caller, person, len(prompt_ids), req.n, max_tokens))
    call = _Call(
        state=state,
        user=caller.user,
        req=req,
        messages=messages,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        served=policy.version,
        arena=arena,
        ticket=ticket,
    )
    ticket.bind(call)
    loop = asyncio.get_running_loop()
    for i, version in enumerate(versions):
        params = SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            max_tokens=max_tokens,
            stop=req.stop,
            seed=None if req.seed is None else req.seed + i,
        )
        if version is None or version == policy.version:  # the version read above, even if swapped out since
            handle = engine.submit(
                messages, params, policy=policy, loop=loop, prompt_ids=prompt_ids, stream=req.stream
            )
        else:
            handle = engine.submit(messages, params, version=version, loop=loop, stream=req.stream)
        call.handles.append(handle)
    return call


async def _watch_disconnect(request: Request, call: _Call) -> None:
    """Cancel the call's sequences when its client goes away. Waits on the ASGI receive channel, which has nothing
    more to deliver after the body but `http.disconnect`, so the watch costs no polling."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cancel_unfinished()


async def _complete(call: _Call, request: Request) -> Response:
    """A non-streaming answer: wait for every choice (bounded by the deadline, abandoned if the client leaves)."""
    n = len(call.handles)
    texts, finishes, n_tokens = [""] * n, ["stop"] * n, 0
    deadline = call.arm_deadline()
    watcher = asyncio.create_task(_watch_disconnect(request, call))
    try:
        async for i, ev in call.events():
            if ev.kind == "delta":
                texts[i] += ev.text
            elif ev.kind == "error":
                metrics.REQUESTS.labels("error").inc()
                raise APIError(503, ev.text, ev.code, headers={"Retry-After": "1"})
            else:
                finishes[i], n_tokens = ev.finish_reason or "stop", n_tokens + ev.tokens
    finally:
        deadline.cancel()
        watcher.cancel()
        call.cancel_unfinished()  # an error in one choice ends the request: free the others' rows
        call.ticket.release()
    if "cancelled" in finishes:  # the client went away: nobody to answer, nothing worth recording
        metrics.REQUESTS.labels("cancelled").inc()
        return Response(status_code=499)  # nginx's "client closed request"; no one reads it
    rec = call.record(texts, finishes, n_tokens)
    await run_in_threadpool(save_completion, call.state.redis, rec, call.state.settings.completion_ttl_s)
    call.observe(n_tokens)
    body = ChatCompletionResponse(
        id=call.cid,
        object="chat.completion",
        created=call.created,
        model=fingerprint(call.served),
        system_fingerprint=fingerprint(call.served),
        usage=Usage(**rec.usage),
        choices=[
            Choice(
                index=i,
                message=AssistantMessage(role="assistant", content=texts[i]),
                finish_reason=finishes[i],
                logprobs=None,
            )
            for i in range(n)
        ],
    )
    return Response(wire(body), media_type="application/json", headers=call.headers)


def _error_line(message: str, code: str) -> str:
    return f"data: {wire(ErrorResponse(**error_body(503, message, code)))}\n\n"


_SLOT, _SLOT_JSON = "\x00", '"\\u0000"'  # a content placeholder no real chunk holds, and its JSON


async def _stream(call: _Call) -> AsyncIterator[str]:
    """The SSE body. Starlette cancels this generator when the client disconnects: `finally` frees the rows."""
    name = fingerprint(call.served)

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(
            id=call.cid,
            object="chat.completion.chunk",
            created=call.created,
            model=name,
            system_fingerprint=name,
            choices=choices,
        )
        if usage is not None:
            body.usage = usage  # set only here: the other chunks carry no usage key at all
        return f"data: {wire(body)}\n\n"

    def one(i: int, delta: Delta, finish: str | None = None) -> str:
        return chunk([ChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=None)])

    templates: dict[int, list[str]] = {}

    def content(i: int, text: str) -> str:
        """A content chunk from its choice's serialised template: encoding only the new text is ~6x cheaper than
        building and dumping the chunk's models, and a stream sends one per token (bench/serve.py, 16 clients)."""
        if i not in templates:
            templates[i] = one(i, Delta(content=_SLOT)).split(_SLOT_JSON)
        head, tail = templates[i]
        return head + json.dumps(text, ensure_ascii=False) + tail

    n = len(call.handles)
    deadline = call.arm_deadline()
    try:
        for i in range(n):
            yield one(i, Delta(role="assistant", content=""))
        texts, finishes, n_tokens = [""] * n, ["stop"] * n, 0
        async for i, ev in call.events():
            if ev.kind == "delta":
                texts[i] += ev.text
                yield content(i, ev.text)
            elif ev.kind == "error":
                metrics.REQUESTS.labels("error").inc()
                yield _error_line(ev.text, ev.code)
                return
            else:
                finishes[i], n_tokens = ev.finish_reason or "stop", n_tokens + ev.tokens
                yield one(i, Delta(), finishes[i])
        rec = call.record(texts, finishes, n_tokens)
        try:  # recorded before [DONE]: feedback may follow at once
            await run_in_threadpool(save_completion, call.state.redis, rec, call.state.settings.completion_ttl_s)
        except redis.RedisError as exc:  # headers are sent: the error goes in the stream
            yield _error_line(redis_unavailable_message(exc), "redis_unavailable")
            return
        call.observe(n_tokens)
        yield chunk([], Usage(**rec.usage))
        yield "data: [DONE]\n\n"
    finally:
        deadline.cancel()
        call.cancel_unfinished()
        call.ticket.release()
