"""The `dmc` command. Each sub-command imports its package only when it runs, so the
research commands never load the web or database stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dmc_cli.client import app as client_app
from dmc_cli.datasets import app as datasets_app
from dmc_cli.experiment import experiment, report
from dmc_cli.serve import serve
from dmc_cli.worker import run_worker

app = typer.Typer(help="Continual-learning image classification on CLIP (DMC / DMC-OT).")
db_app = typer.Typer(help="Database schema management.")
app.add_typer(db_app, name="db")
app.add_typer(client_app, name="client")
app.add_typer(datasets_app, name="datasets")
versions_app = typer.Typer(help="Model versions.")
app.add_typer(versions_app, name="versions")
app.command("worker")(run_worker)
app.command("experiment")(experiment)
app.command("report")(report)
app.command("serve")(serve)


@db_app.command("upgrade")
def db_upgrade(
    url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default: DMC_DATABASE_URL / settings")
    ] = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to")] = "head",
) -> None:
    """Apply the Alembic migrations to the database."""
    from store.db import normalize_url, upgrade_database
    from store.settings import StoreSettings

    target = url or StoreSettings().database_url
    upgrade_database(target, revision=revision)
    shown = normalize_url(target).render_as_string(hide_password=True)  # never the password
    typer.echo(f"database at {shown} is at revision {revision}")


@db_app.command("collect-garbage")
def db_collect_garbage(
    grace_seconds: Annotated[
        float | None,
        typer.Option(help="leave blobs younger than this; default DMC_GC_GRACE_SECONDS"),
    ] = None,
) -> None:
    """Delete version blobs and task uploads that no row references (orphans of a crash);
    counted with the scheduled collections in /metrics."""
    from store.garbage import OBJECTS
    from store.service import Store

    store = Store.open()
    try:
        removed = store.collect_garbage(grace_seconds=grace_seconds)
        store.garbage.add(OBJECTS, len(removed))
    finally:
        store.close()
    typer.echo(f"removed {len(removed)} unreferenced objects")


@versions_app.command("delete")
def versions_delete(
    version_id: Annotated[int, typer.Argument(help="the version to delete", min=1)],
    cascade: Annotated[
        bool, typer.Option(help="also delete every version built on it, directly or not")
    ] = False,
) -> None:
    """Delete a version that is not active and that no version builds on (or, with
    --cascade, its whole subtree), as DELETE /versions/{id} does."""
    from store.errors import VersionInUseError, VersionNotFoundError
    from store.service import Store

    store = Store.open()
    try:
        deleted = store.registry.delete(version_id, cascade=cascade)
    except (VersionInUseError, VersionNotFoundError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    typer.echo(f"deleted versions {', '.join(map(str, deleted))}")


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="port of the demo server")] = 8000,
    folder: Annotated[
        Path, typer.Option(help="the demo service's data (recreated each run)")
    ] = Path("runs/demo"),
    cache_dir: Annotated[
        Path, typer.Option(help="where the offline stand-in model is built")
    ] = Path(".cache/models"),
    images_per_class: Annotated[int, typer.Option(min=4)] = 30,
    test_per_class: Annotated[int, typer.Option(min=1)] = 30,
    keep_serving: Annotated[
        bool, typer.Option(help="leave the server running after the walkthrough")
    ] = True,
) -> None:
    """Start the service in embedded mode and walk through adding classes, predicting and
    rolling back, with Fashion-MNIST images and the offline stand-in model."""
    from dmc_cli.demo import DemoOptions, run_service_demo

    run_service_demo(
        DemoOptions(folder, cache_dir, port, images_per_class, test_per_class, keep_serving)
    )


if __name__ == "__main__":
    app()
