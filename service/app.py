"""The FastAPI application: `create_app(settings, redis_url, engine)` wires routers, errors, limits and state.

Run it with `alignd serve` (which resolves Redis, loads the current policy and starts uvicorn).
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from core.config import Settings
from service.admission import FullGate
from service.auth import load_keyring
from service.deps import AppState
from service.errors import error_body, install_error_handlers
from service.follower import start_follower
from service.routes import admin, chat, feedback, pages, system, versions
from store import keys
from store.client import connect, connect_async

log = logging.getLogger("alignd.service")

# Every router of the API, explicitly: a renamed or missing module fails at import, not by silently serving less.
ROUTERS = (chat.router, system.router, feedback.router, admin.router, versions.router, pages.router)


class BodyLimit:
    """413 for a body over the limit, before any route (or authentication) sees it. A declared Content-Length is
    judged from the header, before a byte is read; a body without one (chunked) is read here up to the limit and
    refused at the first byte over it, so at most `max_bytes` of it is ever held, and the rest is never read (the
    server stops reading the socket, then closes the connection). Plain ASGI rather than `@app.middleware("http")`:
    that wrapper costs ~0.24 ms per request, a third of a feedback call's CPU."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> JSONResponse:
        body = error_body(
            413, f"request body of {size} bytes is over the limit of {self.max_bytes} bytes", "body_too_large"
        )
        return JSONResponse(body, 413, headers={"Connection": "close"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for n, v in scope["headers"] if n == b"content-length"), None)
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                return await self._too_large(str(int(length)))(scope, receive, send)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(f"more than {self.max_bytes}")(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def buffered():
            return replay.pop() if replay else await receive()

        return await self.app(scope, buffered, send)


def app_from_env() -> FastAPI:
    """The app of one `alignd serve --workers N` process (uvicorn's factory): the settings from the environment
    (ALIGND_REDIS_URL, and ALIGND_VLLM_URL of a shared vLLM server, set by the parent), the registry's current version
    loaded, verified and smoke-tested here, an engine and a registry follower of its own."""
    import sys

    from core.config import get_settings
    from service.serving import build_engine
    from store import registry

    settings = get_settings()
    settings.apply_torch_threads(serving=True)
    sys.setswitchinterval(0.0005)  # as `alignd serve` (alignd/commands/run.py says why)
    r = connect(settings.redis_url)
    version = registry.current_version(r)
    if version is None:
        raise RuntimeError("no policy version is registered: run `alignd bootstrap` first")
    engine = build_engine(settings, r, version)
    return create_app(settings, settings.redis_url, engine)


def create_app(settings: Settings, redis_url: str, engine=None) -> FastAPI:
    if settings.key_prefix != keys.prefix():  # store/keys.py builds every key from the process's settings
        raise ValueError(
            f"key prefix {settings.key_prefix!r} differs from this process's ALIGND_KEY_PREFIX {keys.prefix()!r}"
        )
    state = AppState(
        settings=settings,
        redis_url=redis_url,
        redis=connect(redis_url),
        aredis=connect_async(
            redis_url, max_connections=settings.redis_max_connections, timeout_s=settings.redis_pool_timeout_s
        ),
        keyring=load_keyring(settings),
        engine=engine,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is not None:
            state.engine.start()
            state.extras["follower"] = start_follower(state)  # follows the registry: hot-swaps new versions
        yield
        if state.extras.get("follower") is not None:
            state.extras.pop("follower").stop()
        if state.engine is not None:
            state.engine.stop()
        await state.aredis.aclose()
        state.redis.close()

    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.alignd = state
    install_error_handlers(app)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # lets other sites' chat front ends embed /widget.js and post feedback with their users' keys
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Policy-Version"],
        )

    app.add_middleware(FullGate, state=state)  # a full process refuses chat before reading it
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    for router in ROUTERS:
        app.include_router(router)
    return app
