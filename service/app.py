"""The FastAPI application: `create_app(settings, redis_url, engine)` wires routers, errors, limits and state.

Run it with `alignd serve` (which resolves Redis, loads the current policy and starts uvicorn).
"""

from __future__ import annotations

import contextlib
import logging

import redis.asyncio as aredis
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from core.config import Settings
from service.auth import load_keyring
from service.deps import AppState
from service.errors import error_body, install_error_handlers
from service.follower import start_follower
from service.routes import admin, chat, feedback, pages, system, versions
from store.client import connect

log = logging.getLogger("alignd.service")

# Every router of the API, explicitly: a renamed or missing module fails at import, not by silently serving less.
ROUTERS = (chat.router, system.router, feedback.router, admin.router, versions.router, pages.router)


class BodyLimit:
    """413 for a declared Content-Length over the limit, before the body is read. Plain ASGI rather than
    `@app.middleware("http")`: that wrapper costs ~0.24 ms per request, a third of a feedback call's CPU."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                    body = error_body(
                        413,
                        f"request body of {int(value)} bytes is over the limit of {self.max_bytes} bytes",
                        "body_too_large",
                    )
                    return await JSONResponse(body, 413)(scope, receive, send)
        return await self.app(scope, receive, send)


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
    state = AppState(
        settings=settings,
        redis_url=redis_url,
        redis=connect(redis_url),
        aredis=aredis.Redis.from_url(redis_url, decode_responses=True),
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

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    for router in ROUTERS:
        app.include_router(router)
    return app
