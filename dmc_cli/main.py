"""The `dmc` command. Each sub-command imports its package only when it runs, so the
research commands never load the web or database stack."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Continual-learning image classification on CLIP (DMC / DMC-OT).")
db_app = typer.Typer(help="Database schema management.")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    url: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL; default: DMC_DATABASE_URL / settings")
    ] = None,
    revision: Annotated[str, typer.Option(help="Alembic revision to upgrade to")] = "head",
) -> None:
    """Apply the Alembic migrations to the database."""
    from store.db import upgrade_database
    from store.settings import StoreSettings

    target = url or StoreSettings().database_url
    upgrade_database(target, revision=revision)
    typer.echo(f"database at {target} is at revision {revision}")


@app.command()
def demo(
    cache_dir: Annotated[
        Path, typer.Option(help="where the offline stand-in model is built")
    ] = Path(".cache/models"),
    images_per_class: Annotated[int, typer.Option(min=4)] = 40,
) -> None:
    """Learn Fashion-MNIST classes in two tasks with DMC-OT and predict held-out images."""
    from dmc_cli.demo import run_library_demo

    run_library_demo(cache_dir, images_per_class)


if __name__ == "__main__":
    app()
