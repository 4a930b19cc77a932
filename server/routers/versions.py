"""GET /versions, GET /versions/{version_id}, POST /versions/{version_id}/activate,
DELETE /versions/{version_id}."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi import APIRouter, Query

from server.dependencies import AdminAccess, Limit, Offset, ReadAccess, ServicesDep, VersionId
from server.errors import responses
from server.schemas import VersionOut, VersionsDeleted

router = APIRouter(prefix="/versions", tags=["versions"])


@router.get("", response_model=list[VersionOut], responses=responses(401, 403, 422))
async def list_versions(
    services: ServicesDep,
    _: ReadAccess,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[VersionOut]:
    """Model versions, newest first; `active` marks the one the service answers with."""
    registry = services.store.registry

    def read() -> list[VersionOut]:
        active = registry.active()
        active_id = active.id if active else None
        return [
            VersionOut.of(v, active_id=active_id) for v in registry.list(limit=limit, offset=offset)
        ]

    return await asyncio.to_thread(read)


@router.get("/{version_id}", response_model=VersionOut, responses=responses(401, 403, 404, 422))
async def get_version(services: ServicesDep, _: ReadAccess, version_id: VersionId) -> VersionOut:
    """One version: its classes, metrics (`gate`: the promotion gate's decision), size,
    and its newest evaluation on each evaluation set against its parent."""
    store = services.store
    registry = store.registry

    def read() -> VersionOut:
        info = registry.get(version_id)
        active = registry.active()
        evaluations = store.evaluations.for_version(version_id)
        return VersionOut.of(info, active_id=active.id if active else None, evaluations=evaluations)

    return await asyncio.to_thread(read)


@router.post(
    "/{version_id}/activate",
    response_model=VersionOut,
    responses=responses(401, 403, 404, 422),
)
async def activate_version(
    services: ServicesDep, _: AdminAccess, version_id: VersionId
) -> VersionOut:
    """Make a version the active one (activating an older one is a rollback). Every
    replica loads it in the background and swaps it in without dropping requests; if it
    cannot be loaded, the previous one keeps answering and GET /readyz says why."""
    info = await asyncio.to_thread(services.store.registry.activate, version_id)
    services.holder.wake()
    return VersionOut.of(info, active_id=info.id)


@router.delete(
    "/{version_id}", response_model=VersionsDeleted, responses=responses(401, 403, 404, 409, 422)
)
async def delete_version(
    services: ServicesDep,
    _: AdminAccess,
    version_id: VersionId,
    cascade: Annotated[
        bool, Query(description="Also delete every version built on it, directly or not.")
    ] = False,
) -> VersionsDeleted:
    """Delete a version that is not active and that no version builds on (or, with
    `cascade`, its whole subtree); its files no other version shares become garbage and
    are removed. 409 says why a version cannot go: it (or one of its subtree) is active,
    versions build on it, or a queued task builds on it. A version that cannot be loaded
    can always be deleted once another is active."""
    deleted = await asyncio.to_thread(
        functools.partial(services.store.registry.delete, version_id, cascade=cascade)
    )
    return VersionsDeleted(deleted=deleted)
