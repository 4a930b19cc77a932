"""`dmc client ...`: the service's API from the command line, through `dmc_client.Client`
(the server from --url / DMC_URL, the key from --api-key / DMC_API_KEY)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from dmc_client import Client

app = typer.Typer(help="Call a running dmc server (DMC_URL, DMC_API_KEY).")

Url = Annotated[str, typer.Option("--url", envvar="DMC_URL", help="the server's base URL")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="DMC_API_KEY", help="an API key")]
Folder = Annotated[
    Path, typer.Argument(help="one sub-folder of images per class, or a zip/tar archive")
]
DEFAULT_URL = "http://127.0.0.1:8000"


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[Client]:
    """The client; a refusal or an unreachable server ends the command with its message."""
    from dmc_client import Client, DmcClientError

    try:
        with Client(url, api_key) as client:
            yield client
    except DmcClientError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from error


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command("add")
def add(
    folder: Folder,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    wait: Annotated[bool, typer.Option(help="follow the job to its end")] = True,
    activate: Annotated[bool, typer.Option(help="activate the learned version")] = True,
    gate_max_old_drop: Annotated[
        float | None, typer.Option(help="promotion gate: most points lost on old classes")
    ] = None,
    gate_min_new_accuracy: Annotated[
        float | None, typer.Option(help="promotion gate: least % on the new classes")
    ] = None,
) -> None:
    """Add new classes (POST /classes) and follow the job with a progress bar."""
    with _client(url, api_key) as client:
        job = client.add_classes(
            folder,
            wait=wait,
            activate=activate,
            gate_max_old_drop=gate_max_old_drop,
            gate_min_new_accuracy=gate_min_new_accuracy,
        )
    _show(job.model_dump(mode="json"))


@app.command("predict")
def predict(
    files: Annotated[list[Path], typer.Argument(help="image files")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    top_k: Annotated[int, typer.Option(min=1)] = 5,
    version: Annotated[int | None, typer.Option(help="pin a version")] = None,
) -> None:
    """Classify images (POST /predict)."""
    with _client(url, api_key) as client:
        answer = client.predict(files, top_k=top_k, version=version)
    _show(answer.model_dump(mode="json"))


def _version_command(name: str, call: Callable[[Client, int], Any], doc: str) -> None:
    def command(
        version_id: Annotated[int, typer.Argument(help="the version's id")],
        url: Url = DEFAULT_URL,
        api_key: ApiKey = None,
    ) -> None:
        with _client(url, api_key) as client:
            _show(call(client, version_id).model_dump(mode="json"))

    command.__doc__ = doc
    app.command(name)(command)


_version_command("activate", lambda c, i: c.activate(i), "Activate a version (or roll back).")
_version_command("version", lambda c, i: c.version(i), "One version with its evaluations.")
_version_command("evaluate", lambda c, i: c.evaluate(i), "Evaluate a version on the sets now.")


@app.command("versions")
def versions(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the versions, newest first (* marks the active one)."""
    with _client(url, api_key) as client:
        for v in client.versions():
            mark = "*" if v.active else " "
            gate = v.gate or {}
            refused = "  (refused by the gate)" if gate.get("passed") is False else ""
            typer.echo(
                f"{mark} v{v.id}  parent {v.parent_id}  {v.class_count} classes  "
                f"new: {', '.join(v.new_classes)}{refused}"
            )


@app.command("jobs")
def jobs(url: Url = DEFAULT_URL, api_key: ApiKey = None) -> None:
    """List the jobs, newest first."""
    with _client(url, api_key) as client:
        for job in client.jobs():
            said = job.error or job.note or ""
            typer.echo(
                f"job {job.id}  {job.state:9}  {job.progress.percent:5.1f}%  "
                f"version {job.version_id}  {said}".rstrip()
            )


@app.command("add-evaluation-set")
def add_evaluation_set(
    name: Annotated[str, typer.Argument(help="the set's name (a new revision if taken)")],
    folder: Folder,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
) -> None:
    """Upload an evaluation set (POST /evaluation-sets)."""
    with _client(url, api_key) as client:
        _show(client.add_evaluation_set(name, folder).model_dump(mode="json"))
