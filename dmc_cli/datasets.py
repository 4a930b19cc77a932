"""`dmc datasets`: download and build the datasets that are made from fetched files (the
install step; experiments and tests only read what this wrote)."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

app = typer.Typer(help="Datasets built from downloaded files.")


@app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="a dataset with a fetch step, e.g. emoji")],
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            "-o",
            help="a fetch option as key=value (value parsed as YAML), e.g. -o image_size=112 "
            "-o root=.cache/datasets/emoji; repeatable",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Fetch and build a dataset (checked against pinned hashes); a finished build is kept."""
    from dmc_core.data.registry import DatasetError, fetch_dataset

    options = {}
    for item in option or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            typer.echo(f"error: --option expects key=value, got {item!r}", err=True)
            raise typer.Exit(2)
        options[key.strip()] = yaml.safe_load(text)
    try:
        built = fetch_dataset(name, show_progress=progress, **options)
    except DatasetError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"{name}: built in {built}")
