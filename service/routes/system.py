"""GET /v1/models, /healthz (the process answers), /readyz (a policy is loaded, Redis answers, the
API processes are not split between versions past a swap's grace), /metrics."""

from __future__ import annotations

import os
import time

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics, skew
from service.deps import CallerDep, StateDep
from store import registry

router = APIRouter(tags=["system"])


@router.get("/v1/models")
async def list_models(_: CallerDep, state: StateDep):
    data = []
    if state.engine is not None:
        for v in state.engine.loaded_versions():
            data.append(
                {
                    "id": f"alignd-v{v}",
                    "object": "model",
                    "created": 0,
                    "owned_by": "alignd",
                    "current": v == state.engine.current_version,
                }
            )
    return {"object": "list", "data": data}


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep):
    checks: dict[str, object] = {}
    try:
        checks["redis"] = bool(await state.aredis.ping())
    except Exception as exc:  # any Redis failure means not ready, and says why
        checks["redis"] = f"error: {exc}"
    checks["policy_version"] = state.engine.current_version if state.engine else None
    checks["pid"] = os.getpid()  # which API process answered (`alignd serve --workers N` runs several)
    engine_ok = True
    if getattr(state.engine, "kind", None) == "vllm":  # ready only while its vLLM server answers
        engine_ok = state.engine.healthy
        checks["engine"] = {"kind": "vllm", "url": state.engine.url, "healthy": engine_ok}
        if not engine_ok:
            checks["engine"]["error"] = state.engine.health_error
    if state.extras.get("refused"):
        checks["refused_versions"] = state.extras["refused"]
    in_step = True
    if checks["redis"] is True:
        try:
            skew = await run_in_threadpool(_version_skew, state)
        except Exception as exc:
            skew = {"error": f"{type(exc).__name__}: {exc}"}
        if skew:
            checks["version_skew"], in_step = skew, not skew.get("split", True)
    ready = checks["redis"] is True and checks["policy_version"] is not None and engine_ok and in_step
    return JSONResponse({"status": "ready" if ready else "not ready", **checks}, 200 if ready else 503)


def _version_skew(state) -> dict | None:
    """The API processes (heartbeats) serving another version than the registry's current one for longer than a
    swap takes, and whether that splits the deployment (service/skew.py); None when none does."""
    current = registry.current_version(state.redis)
    return skew.report(registry.heartbeats(state.redis), current, time.time(), skew.grace_s(state.settings))


@router.get("/metrics")
async def prometheus_metrics(state: StateDep):
    engine = state.engine
    if engine is not None:
        metrics.VERSION.set(engine.current_version)
        metrics.RUNNING.set(engine.running())
    if getattr(engine, "kind", None) == "vllm":
        metrics.ENGINE_UP.set(int(engine.healthy))
        metrics.ENGINE_FAILED.set(engine.failed)
        for key, value in (await run_in_threadpool(engine.scrape)).items():  # vLLM's own gauges, read now
            metrics.VLLM_GAUGES[key].set(value)
    elif engine is not None:
        metrics.DECODE_STEPS.set(engine.steps)
        metrics.PREFILLS.set(engine.prefills)
        metrics.ENGINE_THREADS.set(engine.torch_threads)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
