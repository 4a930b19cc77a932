"""The API contract under property-based testing: schemathesis generates requests from the
OpenAPI document (every check on, the stateful phase following the documented links)
against a real uvicorn server in the embedded mode (SQLite, a local objects folder, jobs
in a thread, the tiny model) with one learned version, and must find no failure."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import ADMIN_KEY, free_port, live_server

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 17
MAX_EXAMPLES = 30

pytestmark = pytest.mark.slow


@pytest.fixture
def live_url(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path]
) -> Iterator[str]:
    """A live server with version 1 (red, green) active and loaded."""
    settings = settings_factory(port=free_port())
    store = Store.open(settings)
    try:
        store.registry.publish(
            states["v1"], parent_id=None, new_classes=["red", "green"], activate=True
        )
    finally:
        store.close()
    with live_server(settings) as url:
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        yield url


def test_schemathesis_finds_no_failure(live_url: str, tmp_path: Path) -> None:
    """Every phase (examples, coverage, fuzzing, stateful) and every check; the settings
    that are not on this command line are in schemathesis.toml."""
    command = [
        str(Path(sys.executable).with_name("st")),
        f"--config-file={CONFIG}",
        "run",
        f"{live_url}/openapi.json",
        "--checks=all",
        f"--seed={SEED}",
        f"--max-examples={MAX_EXAMPLES}",
        "--workers=1",
        "--generation-database=none",
        f"--header=X-API-Key: {ADMIN_KEY}",
        "--no-color",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    took = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, (
        f"schemathesis failed after {took:.0f}s ({shlex.join(command)}):\n{output[-40000:]}"
    )
    print(f"schemathesis took {took:.0f}s:\n{output[output.find('SUMMARY') :]}")  # pytest -rP
