"""docker-compose.yml and the Dockerfile, checked against the code: Docker cannot run here,
so every service's command, port, environment and health check is compared with what the
CLI accepts and the settings read."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import typer
import yaml

from dmc_cli.main import app as cli_app
from server.settings import ServerSettings
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command if isinstance(command, list) else shlex.split(command)


def _cli_command(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command that `dmc ARGV...` runs, and the arguments left for it."""
    assert argv[0] == "dmc"
    command: click.Command = typer.main.get_command(cli_app)
    args = argv[1:]
    while isinstance(command, click.Group):
        sub = command.get_command(click.Context(command), args[0])
        assert sub is not None, f"`dmc` has no sub-command {args[0]!r}"
        command, args = sub, args[1:]
    return command, args


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def _settings_from(
    env: dict[str, str], cls: type[WorkerSettings], monkeypatch: pytest.MonkeyPatch
) -> WorkerSettings:
    """The settings a container with `env` reads (${VAR} placeholders filled in)."""
    for name in [n for n in os.environ if n.startswith("DMC_")]:
        monkeypatch.delenv(name)
    resolved = {k: re.sub(r"\$\{(\w+)(:[-?][^}]*)?\}", "x" * 32, v) for k, v in env.items()}
    for name, value in resolved.items():
        monkeypatch.setenv(name, value)
    return cls()


@pytest.mark.parametrize("name", ["migrate", "api", "worker"])
def test_commands_are_real_cli_commands(compose: dict[str, Any], name: str) -> None:
    command, args = _cli_command(_command(compose["services"][name]))
    # Parsing fails on an option the command does not have.
    command.make_context(command.name, list(args), resilient_parsing=False)


@pytest.mark.parametrize(("name", "cls"), [("api", ServerSettings), ("worker", WorkerSettings)])
def test_environment_is_read_by_the_settings(
    compose: dict[str, Any], name: str, cls: type[WorkerSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _env(compose["services"][name])
    fields = {f"DMC_{field.upper()}" for field in cls.model_fields}
    unknown = sorted(set(env) - fields)
    assert not unknown, f"{name} sets variables no setting reads: {unknown}"
    settings = _settings_from(env, cls, monkeypatch)
    assert settings.dispatcher == "celery" and settings.object_store == "s3"


def test_services_point_at_each_other(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    services = compose["services"]
    settings = _settings_from(_env(services["api"]), ServerSettings, monkeypatch)
    database = urlparse(settings.database_url)
    postgres = services["postgres"]["environment"]
    assert database.hostname == "postgres" and database.port == 5432
    assert (database.username, database.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert database.path.lstrip("/") == postgres["POSTGRES_DB"]
    assert urlparse(settings.broker_url).hostname == "redis"
    minio = services["minio"]["environment"]
    assert urlparse(settings.s3_endpoint_url).hostname == "minio"
    assert settings.s3_access_key_id == minio["MINIO_ROOT_USER"]
    secret = settings.s3_secret_access_key
    assert secret is not None and secret.get_secret_value() == minio["MINIO_ROOT_PASSWORD"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on missing service {dependency}"
            condition = service["depends_on"][dependency]["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], dependency


def test_api_port_and_health_check(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    api = compose["services"]["api"]
    settings = _settings_from(_env(api), ServerSettings, monkeypatch)
    _, args = _cli_command(_command(api))
    port = int(args[args.index("--port") + 1])
    assert port == settings.port
    assert api["ports"] == [f"{port}:{port}"]
    check = " ".join(api["healthcheck"]["test"])
    assert f"localhost:{port}/healthz" in check
    from server.app import create_app

    paths = create_app(settings).openapi()["paths"]
    assert "/healthz" in paths and "/readyz" in paths
    assert f"EXPOSE {port}" in (ROOT / "Dockerfile").read_text()


def test_worker_health_check_pings_its_own_node(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    argv = _command(worker)
    hostname = argv[argv.index("--hostname") + 1].replace("%h", "$$HOSTNAME")
    check = worker["healthcheck"]["test"][1]
    assert "celery -A worker.celery_app inspect ping" in check and f"-d {hostname}" in check


def test_dockerfile_installs_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("dmc_core", "store", "worker", "server", "migrations", "dmc_cli"):
        assert f"COPY {package} ./{package}" in dockerfile
    assert "torch==2.14.1" in dockerfile and "torchvision==0.29.1" in dockerfile
