"""POST /api-keys, GET /api-keys, DELETE /api-keys/{key_id}: API keys (admin only)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Response

from server.dependencies import AdminAccess, ApiKeyId, ServicesDep
from server.errors import error, responses
from server.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, links
from store.api_keys import ApiKeyInfo

router = APIRouter(prefix="/api-keys", tags=["api keys"])


def _out(info: ApiKeyInfo) -> ApiKeyOut:
    return ApiKeyOut(
        id=info.id,
        name=info.name,
        scopes=sorted(info.scopes),  # type: ignore[arg-type]
        created_at=info.created_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=responses(400, 401, 403, 413, 422)
    | links(201, revoke=("DELETE /api-keys/{key_id}", {"key_id": "id"})),
)
async def create_key(services: ServicesDep, _: AdminAccess, body: ApiKeyCreate) -> ApiKeyCreated:
    """Make a key; the response holds the key itself, which cannot be read again."""
    if not body.name.strip():
        raise error(422, "field name: give the key a name that is not blank")
    info, key = await asyncio.to_thread(services.store.api_keys.create, body.name, body.scopes)
    services.auth.forget()  # a refusal of this key may be remembered
    return ApiKeyCreated(**_out(info).model_dump(), key=key)


@router.get("", response_model=list[ApiKeyOut], responses=responses(401, 403))
async def list_keys(services: ServicesDep, _: AdminAccess) -> list[ApiKeyOut]:
    """Every key (names and scopes; the keys themselves are not stored)."""
    return [_out(i) for i in await asyncio.to_thread(services.store.api_keys.list)]


@router.delete(
    "/{key_id}", status_code=204, response_class=Response, responses=responses(401, 403, 404, 422)
)
async def revoke_key(services: ServicesDep, _: AdminAccess, key_id: ApiKeyId) -> Response:
    """Revoke a key: at once on this replica, within DMC_API_KEY_CACHE_SECONDS on others."""
    if not await asyncio.to_thread(services.store.api_keys.revoke, key_id):
        raise error(404, f"API key {key_id} does not exist")
    services.auth.forget()
    return Response(status_code=204)
