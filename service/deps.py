"""FastAPI dependencies as typed aliases, so route signatures read like prose (`caller: CallerDep`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

import redis
import redis.asyncio as aredis
from fastapi import Depends, Header, Request

from core.config import Settings
from service.auth import Caller, KeyExpired, Keyring, identify
from service.errors import APIError

if TYPE_CHECKING:
    from service.engine import Engine


@dataclass
class AppState:
    settings: Settings
    redis_url: str
    redis: redis.Redis  # sync client, for code running in worker threads
    aredis: aredis.Redis  # async client, for request handlers
    keyring: Keyring
    engine: Engine | None = None
    extras: dict[str, Any] = field(default_factory=dict)


async def get_state(request: Request) -> AppState:  # async: a sync dependency would cost a thread-pool hop
    return request.app.state.alignd


StateDep = Annotated[AppState, Depends(get_state)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def current_caller(state: StateDep, authorization: Annotated[str | None, Header()] = None) -> Caller:
    try:
        caller = identify(state.keyring, _bearer(authorization))
    except KeyExpired as exc:
        raise APIError(401, str(exc), "expired_api_key", headers={"WWW-Authenticate": "Bearer"}) from None
    if caller is None:
        msg = (
            "missing API key: send 'Authorization: Bearer KEY'"
            if not authorization
            else "invalid API key: check the key or ask the operator for a new one"
        )
        raise APIError(401, msg, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]


async def chat_caller(caller: CallerDep) -> Caller:
    if caller.feedback_only:
        raise APIError(
            403, "this API key may only send feedback (POST /v1/feedback); chat needs a full key", "key_scope"
        )
    return caller


ChatCallerDep = Annotated[Caller, Depends(chat_caller)]


async def admin_caller(caller: CallerDep) -> Caller:
    if not caller.is_admin:
        raise APIError(403, "this endpoint needs the admin key (ALIGND_ADMIN_KEY)", "admin_only")
    return caller


AdminDep = Annotated[Caller, Depends(admin_caller)]
