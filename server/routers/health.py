"""GET /healthz (alive), GET /readyz (a version is loaded and the database answers),
GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server.dependencies import ServicesDep
from server.errors import responses
from server.metrics import CONTENT_TYPE
from server.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:
    """The process is alive (it says nothing about the model or the database)."""
    return HealthOut(status="ok")


@router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "Not ready; `reason` says why."}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    """Ready when a version is loaded and the database answers; 503 with the reason
    otherwise. When the active version failed to load and an older one still answers,
    the status is `degraded` (200) and `error` says what went wrong."""
    holder = services.holder

    def ping() -> None:
        with services.store.db.read() as session:
            session.execute(text("SELECT 1"))

    database_error: str | None = None
    try:
        await asyncio.wait_for(asyncio.to_thread(ping), timeout=5.0)
    except Exception as exc:
        database_error = f"the database does not answer: {exc or type(exc).__name__}"
    state = holder.status()
    reason = database_error
    if reason is None and holder.current is None:
        reason = holder.not_ready_reason()
    if reason is not None:
        status = "not ready"
    elif state["error"] is not None:
        status = "degraded"
    else:
        status = "ready"
    body = ReadyOut(
        status=status,  # type: ignore[arg-type]
        database=database_error is None,
        reason=reason,
        **state,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if reason else 200)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format."},
        **responses(),
    },
)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics: requests and latencies per route, predict batch sizes, queue
    depth, model loads and swaps, jobs by state."""
    body = await asyncio.to_thread(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)
