"""GET /healthz (alive), GET /readyz (a version is loaded: predictions can be answered;
the database's state is a field), GET /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from server.auth import API_KEY_HEADER, SCOPE_ADMIN, Principal
from server.dependencies import Services, ServicesDep
from server.errors import UNAVAILABLE, responses
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
async def readyz(request: Request, services: ServicesDep) -> JSONResponse:
    """Ready (200) when a version is loaded: the server can answer predictions, with or
    without the database. `degraded` (200): answering, but the database does not answer
    (`database` is false) or the active version failed to load and an older one answers
    (`error`). 503 with the `reason` otherwise. The errors' details (database host, object
    store bucket and keys) only with an admin key."""
    holder = services.holder
    # Open to load balancers; an admin key, if one is sent, also sees the errors' details.
    detailed = await _is_admin(services, request.headers.get(API_KEY_HEADER))

    def ping() -> None:
        with services.store.db.read() as session:
            session.execute(text("SELECT 1"))

    database_error: str | None = None
    try:
        await asyncio.wait_for(asyncio.to_thread(ping), timeout=5.0)
    except Exception as exc:
        database_error = "the database does not answer" + (
            f": {exc or type(exc).__name__}" if detailed else " (an admin key sees why)"
        )
    state = holder.status(detailed=detailed)
    reason = None if holder.current is not None else holder.not_ready_reason(detailed=detailed)
    if reason is not None:
        status = "not ready"
    elif state["error"] is not None or database_error is not None:
        status = "degraded"
    else:
        status = "ready"
    body = ReadyOut(
        status=status,  # type: ignore[arg-type]
        database=database_error is None,
        database_error=database_error,
        reason=reason,
        **state,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if reason else 200)


async def _is_admin(services: Services, key: str | None) -> bool:
    try:
        scopes = await services.auth.scopes(key)
    except UNAVAILABLE:
        return False
    return scopes is not None and Principal(scopes).allows(SCOPE_ADMIN)


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
