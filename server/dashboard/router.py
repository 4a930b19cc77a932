"""The admin dashboard: versions (with rollback), version detail with plots, jobs with live
progress, and class search. Sign-in takes an admin API key and sets a signed, HTTP-only,
secure session cookie; every page and action refuses without it."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from server.auth import SCOPE_ADMIN
from server.dashboard import plots
from server.dashboard.evaluation_view import version_context
from server.dashboard.session import SESSION_KEY, signed_in
from server.dashboard.tree import version_tree
from server.dependencies import JobId, ServicesDep, VersionId
from server.errors import NotSignedInError
from server.schemas import JobOut
from store.models import PENDING_STATES, JobState
from store.registry import VersionInfo
from store.tasks import ClassRow

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")
STATIC_DIR = Path(__file__).parent / "static"
FINISHED_SHOWN = 20

router = APIRouter(prefix="/admin", include_in_schema=False)


def require_session(request: Request) -> None:
    if not signed_in(request):
        if request.method == "GET":
            raise NotSignedInError
        raise HTTPException(401, "sign in to the dashboard first (/admin/login)")


SignedIn = Annotated[None, Depends(require_session)]


def _page(request: Request, template: str, **context: Any) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, template, context)


# --- sign-in --------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str = "/admin/versions") -> HTMLResponse:
    return _page(request, "login.html", next=next, error=None)


@router.post("/login", response_class=HTMLResponse)
async def login(
    request: Request,
    services: ServicesDep,
    api_key: Annotated[str, Form()],
    next: Annotated[str, Form()] = "/admin/versions",
) -> Response:
    scopes = await services.auth.scopes(api_key)
    if scopes is None or SCOPE_ADMIN not in scopes:
        error = "That key is not an admin API key." if scopes else "That API key is not valid."
        response = _page(request, "login.html", next=next, error=error)
        response.status_code = 401
        return response
    request.session.clear()
    request.session[SESSION_KEY] = True
    target = next if next.startswith("/admin/") else "/admin/versions"
    return RedirectResponse(target, status_code=303)


@router.post("/logout")
async def logout(request: Request) -> Response:
    request.session.clear()
    return RedirectResponse("/admin/login", status_code=303)


# --- versions -------------------------------------------------------------------------------


@router.get("", include_in_schema=False)
async def home(_: SignedIn) -> Response:
    return RedirectResponse("/admin/versions", status_code=303)


@router.get("/versions", response_class=HTMLResponse)
async def versions_page(request: Request, services: ServicesDep, _: SignedIn) -> HTMLResponse:
    registry = services.store.registry

    def read() -> tuple[list[VersionInfo], int | None]:
        active = registry.active()
        return registry.list(limit=200), active.id if active else None

    versions, active_id = await asyncio.to_thread(read)
    rows = version_tree(versions, active_id)
    return _page(request, "versions.html", rows=rows, active_id=active_id)


@router.post("/versions/{version_id}/activate")
async def activate(version_id: VersionId, services: ServicesDep, _: SignedIn) -> Response:
    await asyncio.to_thread(services.store.registry.activate, version_id)
    services.holder.wake()
    return RedirectResponse("/admin/versions", status_code=303)


def _lineage(services: ServicesDep, version_id: int) -> list[VersionInfo]:
    """The version and its ancestors, oldest first."""
    registry = services.store.registry
    chain = [registry.get(version_id)]
    while chain[-1].parent_id is not None:
        chain.append(registry.get(chain[-1].parent_id))
    return chain[::-1]


@router.get("/versions/{version_id}", response_class=HTMLResponse)
async def version_page(
    version_id: VersionId, request: Request, services: ServicesDep, _: SignedIn
) -> HTMLResponse:
    registry = services.store.registry
    version = await asyncio.to_thread(registry.get, version_id)
    active = await asyncio.to_thread(registry.active)
    by_task: dict[int | None, list[str]] = defaultdict(list)
    for row in await asyncio.to_thread(registry.classes, version_id):
        by_task[row.task_id].append(row.name)
    evaluations = await asyncio.to_thread(services.store.evaluations.for_version, version_id)
    return _page(
        request,
        "version.html",
        version=version,
        active_id=active.id if active else None,
        classes_by_task=dict(by_task),
        has_calibration=bool((version.metrics.get("calibration") or {}).get("classes")),
        **version_context(version, evaluations),
    )


@router.get("/versions/{version_id}/accuracy.png")
async def accuracy_plot(version_id: VersionId, services: ServicesDep, _: SignedIn) -> Response:
    lineage = await asyncio.to_thread(_lineage, services, version_id)
    tasks = list(range(1, len(lineage) + 1))
    accuracy = [v.metrics.get("train_accuracy") for v in lineage]
    png = await asyncio.to_thread(plots.accuracy_per_task, tasks, accuracy)
    return Response(png, media_type="image/png")


@router.get("/versions/{version_id}/calibration.png")
async def calibration_plot(version_id: VersionId, services: ServicesDep, _: SignedIn) -> Response:
    registry = services.store.registry
    version = await asyncio.to_thread(registry.get, version_id)
    calibration = version.metrics.get("calibration") or {}
    if not calibration.get("classes"):
        raise HTTPException(404, f"version {version_id} has no calibration diagnostics")
    names = await asyncio.to_thread(registry.class_names, version_id)
    labels = [names[i] if i < len(names) else str(i) for i in calibration["classes"]]
    png = await asyncio.to_thread(plots.calibration_shift, labels, calibration["mean_shift"])
    return Response(png, media_type="image/png")


# --- jobs -----------------------------------------------------------------------------------


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, _: SignedIn) -> HTMLResponse:
    return _page(request, "jobs.html")


@router.get("/jobs.json")
async def jobs_json(services: ServicesDep, _: SignedIn) -> JSONResponse:
    """What the jobs page polls: pending jobs, then the last finished ones."""
    jobs = services.store.jobs
    pending = await asyncio.to_thread(jobs.list, states=PENDING_STATES, limit=200)
    finished = await asyncio.to_thread(
        jobs.list,
        states=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED],
        limit=FINISHED_SHOWN,
    )
    return JSONResponse(
        {
            "pending": [JobOut.of(j).model_dump(mode="json") for j in pending],
            "finished": [JobOut.of(j).model_dump(mode="json") for j in finished],
        }
    )


@router.post("/jobs/{job_id}/cancel")
async def cancel(job_id: JobId, services: ServicesDep, _: SignedIn) -> Response:
    await asyncio.to_thread(services.dispatcher.cancel, job_id)
    return RedirectResponse("/admin/jobs", status_code=303)


# --- classes --------------------------------------------------------------------------------


@router.get("/classes", response_class=HTMLResponse)
async def classes_page(
    request: Request, services: ServicesDep, _: SignedIn, q: str = ""
) -> HTMLResponse:
    registry = services.store.registry

    def read() -> list[ClassRow]:
        active = registry.active()
        return registry.classes(active.id) if active else []

    rows = await asyncio.to_thread(read)
    query = q.strip().lower()
    matches = [row for row in rows if query in row.name.lower()] if query else rows
    return _page(request, "classes.html", q=q, rows=matches, total=len(rows))
