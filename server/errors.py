"""The server's errors, their bodies (`{"detail": "..."}`) and OpenAPI documentation, and
every exception handler of the app: validation, upload, store and dashboard sign-in
errors (`install_handlers`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ConnectionError as ObjectStoreConnectionError
from botocore.exceptions import HTTPClientError as ObjectStoreHTTPError
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from store.errors import (
    ClassBusyError,
    ClassNotFoundError,
    DuplicateClassError,
    EvaluationSetNotFoundError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    StateIntegrityError,
    StoreError,
    TaskNotFoundError,
    VersionInUseError,
    VersionNotFoundError,
)

log = logging.getLogger(__name__)


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""


class UploadError(ServerError):
    """An upload refused as a whole; nothing of it is stored."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class NotSignedInError(ServerError):
    """A dashboard page asked for without the session cookie: answered with a redirect to
    sign-in."""


class ErrorOut(BaseModel):
    detail: str = Field(description="What went wrong and what to change in the request.")


_DESCRIPTIONS: dict[int, str] = {
    400: "The request is malformed (e.g. an unreadable multipart body).",
    401: "No API key, or not a valid one: send it in the `X-API-Key` header.",
    403: "The API key lacks the scope this route needs.",
    404: "No such resource.",
    409: "The request conflicts with the current state (see `detail`).",
    413: "The request body or an archive is over the size limit.",
    415: "The request body has a content type this route does not take.",
    422: "A parameter or an uploaded file is invalid (see `detail`).",
    503: "Not ready or overloaded; `Retry-After` says when to try again where it applies.",
}


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses=` of a route for these error status codes, and 503, which
    every route that uses the services answers while the server starts."""
    return {
        code: {"model": ErrorOut, "description": _DESCRIPTIONS[code]}
        for code in sorted({*codes, 503})
    }


def error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    return HTTPException(status_code=status_code, detail=detail, headers=headers)


def _where(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if not parts:
        return "request"
    kind, rest = parts[0], parts[1:]
    names = {"query": "query parameter", "path": "path parameter", "header": "header"}
    if kind in names and rest:
        return f"{names[kind]} {rest[0]!r}"
    if kind == "body":
        return "field " + ".".join(rest) if rest else "request body"
    return ".".join(parts)


def validation_detail(errors: Sequence[Any]) -> str:
    """One sentence per pydantic error: where, and what is wrong."""
    messages = []
    for item in errors:
        loc = item.get("loc", ()) if isinstance(item, dict) else ()
        msg = item.get("msg", "is invalid") if isinstance(item, dict) else str(item)
        messages.append(f"{_where(loc)}: {msg}")
    return "; ".join(messages) or "the request is invalid"


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


_STORE_STATUS: tuple[tuple[type[StoreError], int], ...] = (
    (VersionNotFoundError, 404),
    (EvaluationSetNotFoundError, 404),
    (ClassNotFoundError, 404),
    (ClassBusyError, 409),
    (VersionInUseError, 409),
    (JobNotFoundError, 404),
    (TaskNotFoundError, 404),
    (JobStateError, 409),
    (IdempotencyConflictError, 409),
    (DuplicateClassError, 409),
    (StateIntegrityError, 409),
)


async def _store_handler(request: Request, exc: Exception) -> JSONResponse:
    for kind, status in _STORE_STATUS:
        if isinstance(exc, kind):
            return JSONResponse({"detail": str(exc)}, status_code=status)
    log.exception("store error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": f"the store failed: {exc}"}, status_code=500)


async def _upload_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UploadError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)


async def _not_signed_in_handler(request: Request, exc: Exception) -> Response:
    return RedirectResponse(f"/admin/login?next={request.url.path}", status_code=303)


async def _internal_handler(request: Request, exc: Exception) -> JSONResponse:
    # Logged (with the traceback) by the server; the client gets JSON like every error.
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
        status_code=500,
    )


def _documented_methods(app: FastAPI, path: str) -> set[str]:
    """The methods the OpenAPI document lists for the paths that `path` matches."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(path):
            methods |= {method.upper() for method in operations}
    return methods | ({"HEAD"} if "GET" in methods else set())


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        # Starlette's 405 lists the methods of the first route on the path only; a path
        # served by several routes (GET and POST /api-keys) allows all of theirs.
        allowed = _documented_methods(request.app, request.url.path)
        if allowed:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, exc)


# The database or the object store is unreachable or too slow (a connect, statement or
# pool timeout): 503, try again later, rather than 500.
UNAVAILABLE: tuple[type[Exception], ...] = (
    OperationalError,
    PoolTimeoutError,
    ObjectStoreConnectionError,
    ObjectStoreHTTPError,
)


def retry_after(request: Request) -> str:
    services = getattr(request.app.state, "services", None)
    return str(services.settings.retry_after_seconds if services is not None else 1)


async def _unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    what = (
        "object store"
        if isinstance(exc, ObjectStoreConnectionError | ObjectStoreHTTPError)
        else "database"
    )
    log.warning("%s %s: the %s is unavailable: %s", request.method, request.url.path, what, exc)
    wait = retry_after(request)
    return JSONResponse(
        {"detail": f"the {what} is unavailable or too slow right now; retry after {wait}s"},
        status_code=503,
        headers={"Retry-After": wait},
    )


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StoreError, _store_handler)
    app.add_exception_handler(UploadError, _upload_handler)
    app.add_exception_handler(NotSignedInError, _not_signed_in_handler)
    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, _unavailable_handler)
    app.add_exception_handler(Exception, _internal_handler)
