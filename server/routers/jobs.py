"""GET /jobs, GET /jobs/{job_id}, POST /jobs/{job_id}/cancel."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.dependencies import AdminAccess, ReadAccess, ServicesDep
from server.errors import responses
from server.schemas import JobOut
from store.models import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[int, Path(ge=1, description="The job's id.")]


@router.get("", response_model=list[JobOut], responses=responses(401, 403, 422))
async def list_jobs(
    services: ServicesDep,
    _: ReadAccess,
    state: Annotated[
        list[JobState] | None, Query(description="Only jobs in these states (repeatable).")
    ] = None,
    task_id: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobOut]:
    """Jobs, newest first."""
    jobs = await asyncio.to_thread(
        services.store.jobs.list, states=state, task_id=task_id, limit=limit, offset=offset
    )
    return [JobOut.of(job) for job in jobs]


@router.get("/{job_id}", response_model=JobOut, responses=responses(401, 403, 404, 422))
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
