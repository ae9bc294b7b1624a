"""Errors in the OpenAI shape: `{"error": {"message", "type", "code", "param"}}`, never a bare 500.

Redis being unreachable is not a bug of ours: any route that meets it answers 503 `redis_unavailable` with a
Retry-After, and the clients' connection pools reconnect on their own once Redis is back.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("alignd.service")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# why a Redis that is up refuses a command (the first word of its error, also inside a script's error)
_REFUSALS = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "MASTERDOWN", "NOPERM", "CROSSSLOT")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "code": code, "param": param}}


def redis_unavailable_message(exc: Exception) -> str:
    if isinstance(exc, redis.ResponseError):  # Redis answered, but refuses writes: say which condition
        words = str(exc).replace("-", " ").split()
        reason = next((w for w in words if w in _REFUSALS), words[0] if words else type(exc).__name__)
        return f"the data store (Redis) refuses writes ({reason}); retry later or tell the operator"
    return f"the data store (Redis) is unavailable ({type(exc).__name__}); retry in a few seconds"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(error_body(exc.status, exc.message, exc.code, exc.param), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # loc holds a character position, not a field
            where = first.get("loc", ("body", "?"))[-1]
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            msg = f"the request body is not valid JSON: {reason} at character {where}"
            return JSONResponse(error_body(400, msg, "invalid_json"), 400)
        if first.get("type") == "model_attributes_type" and first.get("loc") == ("body",):
            return JSONResponse(error_body(400, "the request body must be a JSON object", "invalid_json"), 400)
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = f"{loc}: {first.get('msg', 'invalid request')}" if loc else first.get("msg", "invalid request")
        return JSONResponse(error_body(422, msg, "invalid_value", loc or None), 422)

    # every Redis error is a 503, never a 500: connection loss, BusyLoadingError (a restarted Redis replaying its
    # AOF), and the refusals of a Redis that is up — out of memory, a read-only replica, MISCONF after a failed save
    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError):
        log.warning("Redis unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            error_body(503, redis_unavailable_message(exc), "redis_unavailable"), 503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # a bug, not bad input: log it, answer in the same shape
        log.exception("unhandled error")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), 500)
