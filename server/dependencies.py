"""The app's services, built by the lifespan, and the `Annotated` dependencies the routes
take: the services, the store, the settings, the access checks, and the id and paging
parameters (bounded to the database's integer range)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request, Security

from server.auth import API_KEY_HEADER, SCOPE_ADMIN, SCOPE_PREDICT, Authenticator, Principal
from server.auth import api_key_header as _api_key_header
from server.batcher import Batcher
from server.metrics import Metrics
from server.model import ModelHolder
from server.schemas import DB_INT_MAX
from server.settings import ServerSettings
from store.service import Store
from worker.dispatch import Dispatcher


@dataclass
class Services:
    settings: ServerSettings
    store: Store
    dispatcher: Dispatcher
    holder: ModelHolder
    batcher: Batcher
    metrics: Metrics
    auth: Authenticator
    # Decodes predict images (`server.routers.predict`), apart from the default pool.
    predict_pool: ThreadPoolExecutor


def get_services(request: Request) -> Services:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is None:
        raise HTTPException(503, "the server is starting; try again in a moment")
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def require(scope: str | None) -> Callable[..., Awaitable[Principal]]:
    """A dependency that lets the request through with a key that has `scope` (None: any
    valid key): 401 without a valid key, 403 with one that lacks the scope."""

    async def check(
        services: ServicesDep, key: Annotated[str | None, Security(_api_key_header)]
    ) -> Principal:
        scopes = await services.auth.scopes(key)
        if scopes is None:
            detail = (
                f"send an API key in the {API_KEY_HEADER} header"
                if not key
                else f"the API key in the {API_KEY_HEADER} header is not valid (or was revoked)"
            )
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "APIKey"})
        principal = Principal(scopes)
        if not principal.allows(scope):
            have = ", ".join(sorted(scopes)) or "none"
            raise HTTPException(
                403, f"this route needs an API key with the '{scope}' scope; this key has: {have}"
            )
        return principal

    return check


ReadAccess = Annotated[Principal, Depends(require(None))]
PredictAccess = Annotated[Principal, Depends(require(SCOPE_PREDICT))]
AdminAccess = Annotated[Principal, Depends(require(SCOPE_ADMIN))]


def _id_path(what: str) -> Any:
    return Path(ge=1, le=DB_INT_MAX, description=f"The {what}'s id.")


JobId = Annotated[int, _id_path("job")]
VersionId = Annotated[int, _id_path("version")]
ApiKeyId = Annotated[int, _id_path("API key")]
Limit = Annotated[int, Query(ge=1, le=500, description="At most this many items.")]
Offset = Annotated[int, Query(ge=0, le=DB_INT_MAX, description="Skip this many items.")]
