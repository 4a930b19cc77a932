"""Fixtures for the HTTP API tests: the tiny model (one random initialisation saved once,
so every load is the same model), two learned states, and a fresh app per test on its own
SQLite database and objects folder, with the embedded job dispatcher."""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from dmc_core.backbone import BackboneSpec, load_backbone, save_checkpoint
from dmc_core.learner import Learner
from dmc_core.state import save_state
from server.app import create_app
from server.settings import ServerSettings
from store.registry import VersionInfo
from store.service import Store
from tests.core.toy import COLOUR_NAMES, colour_images, fast_config

ADMIN_KEY = "test-bootstrap-admin-key-0123456789"

# The job's schedule: short (a task of 2 x 4 images learns in well under a second).
LEARNER_OVERRIDES: dict[str, Any] = {
    "stage1.epochs": 1,
    "stage1.batch_size": 8,
    "stage2.epochs": 2,
    "stage2.batch_size": 32,
    "stage2.samples_per_old_class": 16,
    "calibration.samples_per_class": 16,
    "feature_batch_size": 64,
}

# With these the tiny random model tells the colours apart reliably: its class statistics
# (memory-fused inference, nothing trained) do, where its trained prompts do only now and
# then (tests.core.test_learner). For tests that check accuracies.
MEMORY_SCHEDULE: dict[str, Any] = {
    "stage1.epochs": 0,
    "stage2.epochs": 0,
    "inference.memory_score": "mahalanobis",
    "inference.memory_weight": 1.0,
}


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def colour_pngs(colours: list[int], per_class: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """(class name, PNG bytes) of noisy solid-colour images (tests.core.toy)."""
    images, labels = colour_images(colours, per_class, seed)
    return [(COLOUR_NAMES[colours[y]], png(im)) for im, y in zip(images, labels, strict=True)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live_server(settings: ServerSettings, timeout: float = 60.0) -> Iterator[str]:
    """The app served by uvicorn on `settings.port` in a thread; yields its URL once it
    has started, and stops it at the end."""
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=settings.port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "dmc-tiny-vit.pt"
    torch.manual_seed(0)
    save_checkpoint(load_backbone("dmc-tiny-vit").model, path)
    return path


@pytest.fixture(scope="session")
def states(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, Path]:
    """Saved learner states: `v1` knows red and green; `v2` adds blue and yellow."""
    folder = tmp_path_factory.mktemp("states")
    spec = BackboneSpec("dmc-tiny-vit", checkpoint=str(checkpoint))
    learner = Learner(load_backbone(spec), fast_config())
    images, labels = colour_images([0, 1], 8, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    save_state(learner, folder / "v1")
    images, labels = colour_images([2, 3], 8, seed=1)
    learner.learn_task(images, labels, ["blue", "yellow"])
    save_state(learner, folder / "v2")
    return {"v1": folder / "v1", "v2": folder / "v2"}


@pytest.fixture
def settings_factory(
    tmp_path: Path, checkpoint: Path, sqlite_template: Path
) -> Callable[..., ServerSettings]:
    """Settings of a test server: a copy of the migrated SQLite template, a fresh objects
    folder, the tiny model, quick polling; keyword arguments override."""

    def make(**overrides: Any) -> ServerSettings:
        database = tmp_path / "dmc.sqlite"
        if not database.exists():
            shutil.copyfile(sqlite_template, database)
        values: dict[str, Any] = {
            "database_url": f"sqlite:///{database}",
            "objects_dir": tmp_path / "objects",
            "work_dir": tmp_path / "work",
            "backbone_name": "dmc-tiny-vit",
            "backbone_checkpoint": str(checkpoint),
            "device": "cpu",
            "learner_overrides": dict(LEARNER_OVERRIDES),
            "max_image_side": 64,
            "dispatcher": "embedded",
            "migrate_on_start": False,
            "bootstrap_admin_key": ADMIN_KEY,
            "version_poll_seconds": 0.05,
            "version_retry_seconds": 3600.0,
            "batch_max_wait_ms": 2.0,
            "job_sweep_seconds": 0.5,
            "job_progress_interval_seconds": 0.05,
            "job_lease_seconds": 5.0,
        }
        values.update(overrides)
        (tmp_path / "work").mkdir(exist_ok=True)
        return ServerSettings(**values)

    return make


@dataclass
class Server:
    """A running app (TestClient), a second handle on its store, and API keys."""

    client: TestClient
    store: Store
    settings: ServerSettings
    states: dict[str, Path]
    keys: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str = "admin") -> dict[str, str]:
        return {"X-API-Key": self.keys[who]}

    def publish(self, name: str, *, parent: int | None, activate: bool = True) -> VersionInfo:
        classes = {"v1": ["red", "green"], "v2": ["blue", "yellow"]}[name]
        return self.store.registry.publish(
            self.states[name], parent_id=parent, new_classes=classes, activate=activate
        )

    def metric(self, name: str, labels: str = "") -> float:
        """A sample of GET /metrics, e.g. metric("dmc_predict_batch_size_count")."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        return 0.0

    def wait_ready(self, version_id: int | None = None, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = self.client.get("/readyz")
            body: dict[str, Any] = response.json()
            if response.status_code == 200 and (
                version_id is None or body["version_id"] == version_id
            ):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"not ready: {body}")
            time.sleep(0.02)

    def wait_job(self, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.client.get(f"/jobs/{job_id}", headers=self.headers()).json()
            if body["state"] in ("succeeded", "failed", "cancelled"):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} did not finish: {body}")
            time.sleep(0.05)

    def predict(self, images: list[bytes], who: str = "predict", **params: Any) -> Any:
        files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
        return self.client.post("/predict", files=files, params=params, headers=self.headers(who))


@pytest.fixture
def server_factory(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path]
) -> Iterator[Callable[..., Server]]:
    """Start an app with `publish=["v1", ...]` published first (the last one active)."""
    opened: list[tuple[TestClient, Store]] = []

    def start(
        publish: tuple[str, ...] = ("v1",),
        create_app_kwargs: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> Server:
        settings = settings_factory(**overrides)
        store = Store.open(settings)
        server = Server(client=None, store=store, settings=settings, states=states)  # type: ignore[arg-type]
        parent = None
        for name in publish:
            parent = server.publish(name, parent=parent).id
        client = TestClient(create_app(settings, **(create_app_kwargs or {})))
        client.__enter__()
        opened.append((client, store))
        server.client = client
        server.keys = {
            "admin": ADMIN_KEY,
            "predict": store.api_keys.create("predictor", ["predict"])[1],
            "admin-db": store.api_keys.create("administrator", ["admin"])[1],
        }
        return server

    yield start
    for client, store in reversed(opened):
        client.__exit__(None, None, None)
        store.close()


@pytest.fixture
def server(server_factory: Callable[..., Server]) -> Server:
    """A server with version 1 (red, green) active and loaded."""
    started = server_factory()
    started.wait_ready(version_id=1)
    return started
