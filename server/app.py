"""The app factory: `create_app(settings)` builds the FastAPI app; its lifespan opens the
store (applying the migrations in the embedded mode), starts the job dispatcher, the
model holder and the inference batcher, and stops them in reverse order."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dmc_core.device import resolve_device
from server.auth import Authenticator
from server.batcher import Batcher
from server.dashboard import evaluations as dashboard_evaluations
from server.dashboard import router as dashboard
from server.dashboard import session as dashboard_session
from server.dependencies import Services
from server.errors import install_handlers
from server.metrics import Metrics, MetricsMiddleware
from server.model import Loader, ModelHolder, store_loader
from server.routers import (
    classes,
    evaluation_sets,
    evaluations,
    health,
    jobs,
    keys,
    predict,
    versions,
)
from server.settings import ServerSettings
from store.garbage import GarbageTotal
from store.service import Store
from worker.dispatch import Dispatcher
from worker.dispatchers import make_dispatcher

log = logging.getLogger(__name__)

DispatcherFactory = Callable[[ServerSettings, Store], Dispatcher]
LoaderFactory = Callable[[Store, ServerSettings], Loader]

DESCRIPTION = """
Continual-learning image classification on CLIP (DMC / DMC-OT).

* **POST /classes** adds classes (a *task*); a background *job* learns them into a new
  *version*. Follow it at **GET /jobs/{job_id}**.
* **POST /predict** answers the top classes of images with the active version.
* **GET /versions**, **POST /versions/{id}/activate**: the versions, and rollback.

Send an API key in the `X-API-Key` header: scope `predict` for POST /predict, `admin`
for every route that changes something. Errors are `{"detail": "..."}`, saying what to fix.
"""


class BodyLimitMiddleware:
    """Answers 413 to a request body over `max_bytes`: at once when Content-Length says
    so, else as soon as the streamed body goes over."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return (
            f"the request body is over the limit of {self.max_bytes} bytes "
            "(DMC_MAX_REQUEST_BYTES); send fewer or smaller files, or split the upload "
            "into several tasks"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._detail()}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self._detail())
            return message

        await self.app(scope, limited, send)


def _default_loader(store: Store, settings: ServerSettings) -> Loader:
    return store_loader(
        store.registry,
        device=resolve_device(settings.device),
        precision=settings.precision,
        cache_dir=settings.model_cache_dir,
        work_dir=settings.work_dir,
    )


def _mount_dashboard(app: FastAPI, settings: ServerSettings) -> None:
    secret = settings.session_secret
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret.get_secret_value() if secret else secrets.token_urlsafe(32),
        session_cookie=dashboard_session.COOKIE_NAME,
        max_age=settings.session_max_age_seconds,
        same_site="strict",
        https_only=True,
    )
    app.include_router(dashboard.router)
    app.include_router(dashboard_evaluations.router)
    app.mount("/admin/static", StaticFiles(directory=dashboard.STATIC_DIR), name="admin-static")


def create_app(
    settings: ServerSettings | None = None,
    *,
    dispatcher_factory: DispatcherFactory | None = None,
    loader_factory: LoaderFactory | None = None,
) -> FastAPI:
    """The service as an ASGI app. `dispatcher_factory` and `loader_factory` replace how
    jobs are dispatched and versions loaded (tests)."""
    settings = settings or ServerSettings()
    metrics = Metrics()
    make_dispatch = dispatcher_factory or make_dispatcher
    make_loader = loader_factory or _default_loader

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.auth_enabled:
            log.warning("authentication is OFF (DMC_AUTH_ENABLED=false): demo use only")
        store = await asyncio.to_thread(Store.open, settings, upgrade=settings.migrate)
        dispatcher = make_dispatch(settings, store)
        holder = ModelHolder(
            store.registry,
            make_loader(store, settings),
            metrics=metrics,
            poll_seconds=settings.version_poll_seconds,
            retry_seconds=settings.version_retry_seconds,
            cache_size=settings.pinned_versions_cached,
            cache_bytes=settings.pinned_versions_max_bytes,
            loads_at_once=settings.version_loads_at_once,
            load_wait_seconds=settings.version_load_wait_seconds,
        )
        batcher = Batcher(
            max_batch=settings.batch_max_size,
            max_wait_seconds=settings.batch_max_wait_ms / 1000,
            capacity=settings.batch_queue_size,
            metrics=metrics,
        )
        bootstrap = settings.bootstrap_admin_key
        auth = Authenticator(
            store.api_keys.verify,
            enabled=settings.auth_enabled,
            bootstrap_key=bootstrap.get_secret_value() if bootstrap else None,
            cache_seconds=settings.api_key_cache_seconds,
        )
        predict_pool = ThreadPoolExecutor(
            max_workers=settings.predict_threads, thread_name_prefix="dmc-predict"
        )
        try:
            await asyncio.to_thread(dispatcher.start)
            await holder.start()
            await batcher.start()
            app.state.services = Services(
                settings=settings,
                store=store,
                dispatcher=dispatcher,
                holder=holder,
                batcher=batcher,
                metrics=metrics,
                auth=auth,
                predict_pool=predict_pool,
            )
            log.info(
                "dmc server ready for requests (dispatcher %s, auth %s)",
                settings.dispatcher,
                "on" if settings.auth_enabled else "OFF",
            )
            yield
        finally:
            app.state.services = None
            await batcher.stop()
            predict_pool.shutdown(wait=False, cancel_futures=True)
            auth.close()
            await holder.stop()
            await asyncio.to_thread(dispatcher.close)
            await asyncio.to_thread(store.close)

    app = FastAPI(
        title="dmc",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        form_limits={
            "max_files": settings.max_upload_images + 1,
            "max_fields": settings.max_upload_images + 16,
        },
    )
    app.state.services = None

    def count_jobs() -> dict[str, int]:
        services: Services | None = app.state.services
        return services.store.jobs.counts() if services else {}

    def garbage_totals() -> list[GarbageTotal]:
        services: Services | None = app.state.services
        return services.store.garbage.totals() if services else []

    metrics.watch_jobs(count_jobs)
    metrics.watch_garbage(garbage_totals)
    install_handlers(app)
    _mount_dashboard(app, settings)
    for module in (classes, predict, jobs, versions, evaluations, evaluation_sets, keys, health):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
