"""POST /versions/{version_id}/evaluate: evaluate a version on the evaluation sets now."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from server.dependencies import AdminAccess, ServicesDep, VersionId
from server.errors import responses
from server.schemas import VersionOut
from worker.evaluation import evaluate_version

router = APIRouter(prefix="/versions", tags=["versions"])


@router.post(
    "/{version_id}/evaluate",
    response_model=VersionOut,
    responses=responses(401, 403, 404, 422),
)
async def evaluate(services: ServicesDep, _: AdminAccess, version_id: VersionId) -> VersionOut:
    """Evaluate the version, and its parent on the same images, on the newest revision of
    every evaluation set (e.g. one uploaded after the version was learned), store the
    results and answer the version with them. Runs in the request: the time grows with
    the sets' images."""
    store = services.store

    def run() -> VersionOut:
        evaluations = evaluate_version(store, services.settings, version_id)
        active = store.registry.active()
        return VersionOut.of(
            store.registry.get(version_id),
            active_id=active.id if active else None,
            evaluations=evaluations,
        )

    return await asyncio.to_thread(run)
