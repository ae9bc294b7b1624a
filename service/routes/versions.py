"""Operator endpoints for the model registry and the online loop (admin key only).

GET /admin/versions    every version with metrics, provenance, status, refusals and live arena win rate
POST /admin/rollback   {"version": N}: make an earlier version current again (registry CAS, event "rollback")
POST /admin/train      enqueue a training cycle now on the `train` queue (by task name: service/ never imports
                       workers/, so the task is sent with a bare Celery client)
"""

from __future__ import annotations

from typing import Any

import celery
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from core import names
from service.deps import AdminDep, AppState, StateDep
from service.errors import APIError
from store import keys, registry
from store.train_config import BadOverrides, check_overrides

router = APIRouter(prefix="/admin", tags=["versions"])


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    version: int = Field(ge=1, description="a registered policy version")


class TrainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_events: int = Field(0, ge=0, description="the cycle skips unless this many new feedback events wait")
    overrides: dict[str, Any] | None = Field(None, description="CycleConfig fields for this cycle only")
    unsafe: bool = Field(
        False, description="allow overriding non-tuning fields (gate, eval suites, loop settings); recorded"
    )


@router.get("/versions")
def list_versions(state: StateDep, _: AdminDep) -> dict[str, Any]:
    """Versions (provenance, metrics, status, live arena win rate vs parent), reward versions, recent events."""
    listing = registry.describe(state.redis)
    engine = state.engine
    listing["serving"] = {
        "current": engine.current_version if engine else None,
        "loaded": engine.loaded_versions() if engine else [],
        "arena_pair": state.extras.get("arena_pair"),
        "refused": state.extras.get("refused", {}),  # versions this process refused to load, with the reason
    }
    return listing


@router.post("/rollback")
def rollback(body: RollbackIn, state: StateDep, caller: AdminDep) -> dict[str, Any]:
    """Make `version` current again; every API process follows within its poll interval."""
    r = state.redis
    meta = registry.get_version(r, body.version)
    if meta is None:
        raise APIError(
            404,
            f"version {body.version} is not in the registry: GET /admin/versions lists them",
            "version_not_found",
            "version",
        )
    if meta.get("refused"):
        raise APIError(
            409,
            f"version {body.version} was refused by an API process ({meta['refused']}); pick another version",
            "version_refused",
            "version",
        )
    current = registry.current_version(r)
    if current == body.version:
        return {"object": "rollback", "current": current, "previous": current, "changed": False}
    try:
        previous = registry.set_current(
            r,
            body.version,
            expected=current,
            event="rollback",
            detail={"from": current, "reason": "POST /admin/rollback", "by": caller.user},
        )
    except registry.RegistryConflict as exc:
        raise APIError(409, f"{exc}; retry", "registry_conflict") from None
    return {"object": "rollback", "current": body.version, "previous": previous, "changed": True}


def _sender(state: AppState) -> celery.Celery:
    sender = state.extras.get("celery_sender")
    if sender is None:
        sender = state.extras["celery_sender"] = celery.Celery(
            "alignd-api", broker=state.redis_url, broker_transport_options=keys.celery_transport_options()
        )
    return sender


@router.post("/train", status_code=202)
async def train(state: StateDep, _: AdminDep, body: TrainIn | None = None) -> JSONResponse:
    """Enqueue one training cycle now (a worker on the `train` queue runs it); returns the task id."""
    body = body or TrainIn()
    checked = None
    if body.overrides:
        try:  # before anything is enqueued (store/train_config.py); None: no worker has started yet to say
            checked = await run_in_threadpool(check_overrides, state.redis, body.overrides, unsafe=body.unsafe)
        except BadOverrides as exc:
            raise APIError(422, str(exc), "invalid_overrides", "overrides") from None
        if body.unsafe:
            registry.record_event(state.redis, "unsafe_overrides", keys=sorted(body.overrides), by="POST /admin/train")
    kwargs = {"trigger": "api", "min_events": body.min_events, "overrides": body.overrides}
    try:
        result = await run_in_threadpool(
            _sender(state).send_task, names.TRAIN_CYCLE, kwargs=kwargs, queue=names.TRAIN_QUEUE
        )
    except Exception as exc:  # the broker is the same Redis; say so rather than 500
        raise APIError(503, f"could not enqueue the training cycle: {exc}", "broker_unavailable") from None
    answer = {"object": "train.enqueued", "task_id": result.id, "queue": names.TRAIN_QUEUE}
    if body.overrides and checked is None:  # the worker checks them when the cycle starts
        answer["overrides_checked"] = False
    return JSONResponse(answer, 202)
