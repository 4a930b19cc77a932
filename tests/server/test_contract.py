"""The API contract under property-based testing: schemathesis generates requests from the
OpenAPI document (every check on, the stateful phase following the documented links)
against a real uvicorn server in the embedded mode (SQLite, a local objects folder, jobs
in a thread, the tiny model) with one learned version, and must find no failure."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import ADMIN_KEY

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).with_name("schemathesis.toml")
SEED = 17
MAX_EXAMPLES = 30

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_url(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path]
) -> Iterator[str]:
    """A uvicorn server in a thread with version 1 (red, green) active and loaded."""
    port = _free_port()
    settings = settings_factory(port=port)
    store = Store.open(settings)
    try:
        store.registry.publish(
            states["v1"], parent_id=None, new_classes=["red", "green"], activate=True
        )
    finally:
        store.close()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (server.started and httpx.get(f"{url}/readyz").status_code == 200):
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


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
