"""`dmc serve`: the HTTP API (and the embedded job thread in the embedded mode)."""

from __future__ import annotations

from typing import Annotated

import typer


def serve(
    host: Annotated[str | None, typer.Option(help="bind address; default: DMC_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port; default: DMC_PORT")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="log level; default: DMC_LOG_LEVEL (info)")
    ] = None,
) -> None:
    """Serve the HTTP API with uvicorn: one process, one model in memory.

    Settings come from the DMC_* environment (database, objects, model, dispatcher, auth,
    limits, batching). With DMC_DISPATCHER=embedded (the default) the jobs run in a thread
    of this process and the database is migrated at start; with celery they go to
    `dmc worker` processes over Redis. OpenAPI docs at /docs.
    """
    import logging

    import uvicorn

    from server.app import create_app
    from server.settings import ServerSettings

    overrides = {
        k: v
        for k, v in {"host": host, "port": port, "log_level": log_level}.items()
        if v is not None
    }
    settings = ServerSettings(**overrides)  # type: ignore[arg-type]
    # Our packages log at the chosen level; the libraries (open_clip's chatter) at warning.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for package in ("server", "worker", "store", "dmc_core"):
        logging.getLogger(package).setLevel(settings.log_level.upper())
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # One process: the model, the batcher and the embedded job thread live in it.
        workers=1,
        timeout_graceful_shutdown=30,
    )
