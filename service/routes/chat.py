"""POST /v1/chat/completions — OpenAI-compatible chat, streaming (SSE) or not, n = 1…4 choices.

Every completion is recorded in Redis (`store.completions`) before the client sees its end, so feedback can refer to
its `id` at once. The policy version is in `system_fingerprint` and the `X-Policy-Version` header.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from service import metrics
from service.deps import AppState, CallerDep, StateDep
from service.engine import Event, Handle, SamplingParams
from service.errors import APIError
from service.ratelimit import enforce
from service.schemas import ChatCompletionRequest
from store.completions import ChoiceRecord, CompletionRecord, save_completion

router = APIRouter(prefix="/v1", tags=["chat"])


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


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, caller: CallerDep, state: StateDep):
    settings = state.settings
    engine = state.engine
    if engine is None:
        raise APIError(503, "no policy is loaded yet: run `alignd bootstrap` or wait for the server to start",
                       "no_policy")
    await enforce(state.aredis, "chat", caller.user, settings.chat_rate_per_minute, 60, "chat requests per minute")
    default_tokens = min(settings.default_max_tokens, settings.max_new_tokens)
    max_tokens = req.max_completion_tokens or req.max_tokens or default_tokens
    if max_tokens > settings.max_new_tokens:
        raise APIError(422, f"max_tokens must be at most {settings.max_new_tokens}", "invalid_value", "max_tokens")
    messages = [m.model_dump() for m in req.messages]
    policy = engine.current
    prompt_ids = await run_in_threadpool(policy.encode_chat, messages)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise APIError(413, f"the prompt has {len(prompt_ids)} tokens; the limit is {settings.max_prompt_tokens}",
                       "prompt_too_long", "messages")
    versions, arena = _choice_versions(state, req.n)
    loop = asyncio.get_running_loop()
    handles = []
    for i, version in enumerate(versions):
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens, stop=req.stop,
                                seed=None if req.seed is None else req.seed + i)
        if version is None or version == policy.version:  # the version read above, even if swapped out since
            handles.append(engine.submit(messages, params, policy=policy, loop=loop, prompt_ids=prompt_ids))
        else:
            handles.append(engine.submit(messages, params, version=version, loop=loop))
    served = policy.version
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    started = time.monotonic()
    headers = {"X-Policy-Version": str(served)}

    def record(texts: list[str], finishes: list[str], n_tokens: int) -> CompletionRecord:
        return CompletionRecord(
            id=cid, user=caller.user, messages=messages, version=served, arena=arena,
            choices=[ChoiceRecord(index=i, text=texts[i], finish_reason=finishes[i], version=h.version)
                     for i, h in enumerate(handles)],
            params={"temperature": req.temperature, "top_p": req.top_p, "max_tokens": max_tokens, "stop": req.stop,
                    "seed": req.seed, "n": req.n, "stream": req.stream, "client_user": req.user},
            usage={"prompt_tokens": len(prompt_ids), "completion_tokens": n_tokens,
                   "total_tokens": len(prompt_ids) + n_tokens})

    def observe(n_tokens: int) -> None:
        metrics.REQUESTS.labels("ok").inc()
        metrics.TOKENS.labels(str(served)).inc(n_tokens)
        metrics.LATENCY.observe(time.monotonic() - started)
        firsts = [h.first_token_at for h in handles if h.first_token_at]
        if firsts:
            metrics.TTFT.observe(min(firsts) - started)

    if not req.stream:
        texts, finishes, n_tokens = [""] * len(handles), ["stop"] * len(handles), 0
        async for i, ev in _merged(handles):
            if ev.kind == "delta":
                texts[i] += ev.text
            elif ev.kind == "error":
                metrics.REQUESTS.labels("error").inc()
                raise APIError(503, ev.text, "generation_failed")
            else:
                finishes[i], n_tokens = ev.finish_reason or "stop", n_tokens + ev.tokens
        rec = record(texts, finishes, n_tokens)
        await run_in_threadpool(save_completion, state.redis, rec)
        observe(n_tokens)
        body = {"id": cid, "object": "chat.completion", "created": created, "model": f"alignd-v{served}",
                "system_fingerprint": fingerprint(served),
                "choices": [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                             "finish_reason": finishes[i], "logprobs": None} for i in range(len(handles))],
                "usage": rec.usage}
        return JSONResponse(body, headers=headers)

    async def sse() -> AsyncIterator[str]:
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": f"alignd-v{served}",
                "system_fingerprint": fingerprint(served)}

        def chunk(i: int, delta: dict, finish: str | None = None) -> str:
            body = {**base, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n"

        for i in range(len(handles)):
            yield chunk(i, {"role": "assistant", "content": ""})
        texts, finishes, n_tokens = [""] * len(handles), ["stop"] * len(handles), 0
        async for i, ev in _merged(handles):
            if ev.kind == "delta":
                texts[i] += ev.text
                yield chunk(i, {"content": ev.text})
            elif ev.kind == "error":
                metrics.REQUESTS.labels("error").inc()
                yield f"data: {json.dumps({'error': {'message': ev.text, 'type': 'service_unavailable'}})}\n\n"
                return
            else:
                finishes[i], n_tokens = ev.finish_reason or "stop", n_tokens + ev.tokens
                last_finish = finishes[i]
                pending_finish = (i, last_finish)
                yield chunk(*pending_finish[:1], {}, pending_finish[1])
        rec = record(texts, finishes, n_tokens)
        await run_in_threadpool(save_completion, state.redis, rec)  # recorded before [DONE]: feedback may follow
        observe(n_tokens)
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': rec.usage})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
