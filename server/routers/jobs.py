"""GET /jobs, GET /jobs/{job_id}, POST /jobs/{job_id}/cancel."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query

from server.dependencies import AdminAccess, JobId, Limit, Offset, ReadAccess, ServicesDep
from server.errors import responses
from server.schemas import DB_INT_MAX, JobOut, links
from store.models import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])


@router.get("", response_model=list[JobOut], responses=responses(401, 403, 422))
async def list_jobs(
    services: ServicesDep,
    _: ReadAccess,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    task_id: Annotated[
        int | None, Query(ge=1, le=DB_INT_MAX, description="Only the jobs of this task.")
    ] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[JobOut]:
    """Jobs, newest first."""
    jobs = await asyncio.to_thread(
        services.store.jobs.list, states=state, task_id=task_id, limit=limit, offset=offset
    )
    return [JobOut.of(job) for job in jobs]


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses=responses(401, 403, 404, 422)
    | links(
        200,
        version=("GET /versions/{version_id}", {"version_id": "version_id"}),
        activate=("POST /versions/{version_id}/activate", {"version_id": "version_id"}),
    ),
)
async def get_job(services: ServicesDep, _: ReadAccess, job_id: JobId) -> JobOut:
    """A job's state and progress; a failed job's `error` says what to do."""
    return JobOut.of(await asyncio.to_thread(services.store.jobs.get, job_id))


@router.post(
    "/{job_id}/cancel", response_model=JobOut, responses=responses(401, 403, 404, 409, 422)
)
async def cancel_job(services: ServicesDep, _: AdminAccess, job_id: JobId) -> JobOut:
    """Cancel a queued or running job: it ends `cancelled` and publishes no version.
    A finished job cannot be cancelled (409)."""
    return JobOut.of(await asyncio.to_thread(services.dispatcher.cancel, job_id))
