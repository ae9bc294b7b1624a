"""The FastAPI application: `create_app(settings, redis_url, engine)` wires routers, errors, limits and state.

Run it with `alignd serve` (which resolves Redis, loads the current policy and starts uvicorn).
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import redis.asyncio as aredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from alignd.config import Settings
from service.auth import load_keyring
from service.deps import AppState
from service.errors import error_body, install_error_handlers
from store.client import connect

log = logging.getLogger("alignd.service")

# Routers are found by module name so that a router added by a later feature is one line here.
ROUTERS = ("service.routes.chat", "service.routes.system", "service.routes.feedback", "service.routes.admin",
           "service.routes.versions", "service.routes.pages")


def create_app(settings: Settings, redis_url: str, engine=None) -> FastAPI:
    state = AppState(settings=settings, redis_url=redis_url, redis=connect(redis_url),
                     aredis=aredis.Redis.from_url(redis_url, decode_responses=True), keyring=load_keyring(settings),
                     engine=engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is not None:
            state.engine.start()
        for hook in state.extras.get("startup", []):
            await hook(state)
        yield
        for hook in state.extras.get("shutdown", []):
            await hook(state)
        if state.engine is not None:
            state.engine.stop()
        await state.aredis.aclose()
        state.redis.close()

    app = FastAPI(title="alignd", version="0.1.0", lifespan=lifespan)
    app.state.alignd = state
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Content-Length is checked before the body is read; chunked bodies are checked by the route's own parsing.
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return JSONResponse(error_body(413, f"request body of {length} bytes is over the limit of "
                                                f"{settings.max_body_bytes} bytes", "body_too_large"), 413)
        return await call_next(request)

    for name in ROUTERS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        app.include_router(module.router)
    return app
