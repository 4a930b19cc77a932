"""End to end, deployed mode: the real `dmc serve` process on PostgreSQL, with Redis and a
real `dmc worker` (Celery) process. Two tasks are added over HTTP back to back, the jobs
run in order, and the server answers with the second version.

PostgreSQL comes from DMC_TEST_POSTGRES_URL (default postgres@127.0.0.1:5432) and Redis
from DMC_TEST_REDIS_URL (default redis://127.0.0.1:6379/9); when a variable is unset and
its server cannot be reached the test is skipped, when it is set it fails instead. Every
process is stopped at the end, also on failure; the database and the queue's Redis keys
are removed.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dmc_core.backbone import load_backbone, save_checkpoint
from tests.core.toy import COLOUR_NAMES, colour_images
from tests.services import delete_redis_keys, postgres_database, redis_client

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "e2e-bootstrap-admin-key-0123456789"
LEARNER_OVERRIDES = {
    "stage1.epochs": 1,
    "stage1.batch_size": 8,
    "stage2.epochs": 2,
    "stage2.samples_per_old_class": 16,
    "calibration.samples_per_class": 16,
}

pytestmark = pytest.mark.slow


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database("dmc_e2e") as url:
        yield url


@pytest.fixture
def redis_queue() -> Iterator[tuple[str, str]]:
    """(broker URL, a queue name of this test); the queue's keys are deleted at the end."""
    queue = f"dmc-e2e-{uuid.uuid4().hex[:10]}"
    with redis_client() as (url, client):
        try:
            yield url, queue
        finally:
            delete_redis_keys(client, queue)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Process:
    """A `dmc ...` subprocess in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmc_cli.main", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"{what}: the process exited:\n{self.log()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: timed out:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL if it is still there after 15 s."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in reversed(started):
        process.stop()


def task_zip(colours: list[int], per_class: int, seed: int) -> bytes:
    images, labels = colour_images(colours, per_class, seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            data = io.BytesIO()
            image.save(data, format="PNG")
            archive.writestr(f"{COLOUR_NAMES[colours[label]]}/{i}.png", data.getvalue())
    return buffer.getvalue()


def wait_json(
    client: httpx.Client, path: str, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(path).json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"GET {path}: {body}")
        time.sleep(0.2)


def test_two_tasks_over_http_with_a_celery_worker(
    tmp_path: Path,
    postgres_url: str,
    redis_queue: tuple[str, str],
    processes: list[Process],
) -> None:
    checkpoint = tmp_path / "dmc-tiny-vit.pt"
    torch.manual_seed(0)
    save_checkpoint(load_backbone("dmc-tiny-vit").model, checkpoint)
    port = free_port()
    broker, queue = redis_queue
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DMC_")},
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "DMC_DATABASE_URL": postgres_url,
        "DMC_OBJECTS_DIR": str(tmp_path / "objects"),
        "DMC_WORK_DIR": str(tmp_path),
        "DMC_BACKBONE_NAME": "dmc-tiny-vit",
        "DMC_BACKBONE_CHECKPOINT": str(checkpoint),
        "DMC_DEVICE": "cpu",
        "DMC_LEARNER_OVERRIDES": json.dumps(LEARNER_OVERRIDES),
        "DMC_MAX_IMAGE_SIDE": "64",
        "DMC_DISPATCHER": "celery",
        "DMC_BROKER_URL": broker,
        "DMC_CELERY_QUEUE": queue,
        "DMC_JOB_PROGRESS_INTERVAL_SECONDS": "0.2",
        "DMC_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
        "DMC_PORT": str(port),
        "DMC_VERSION_POLL_SECONDS": "0.2",
    }
    worker = Process(["worker", "--hostname=e2e@test"], env, tmp_path / "worker.log")
    processes.append(worker)
    server = Process(["serve"], env, tmp_path / "server.log")
    processes.append(server)

    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": ADMIN_KEY}

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    server.wait_for("dmc serve", healthy, timeout=60)
    worker.wait_for("dmc worker", lambda: " ready." in worker.log(), timeout=60)

    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "no version is active" in ready.json()["reason"]

        submitted = []
        for colours, seed in (([0, 1], 0), ([2, 3], 1)):
            response = client.post(
                "/classes", files={"archive": ("task.zip", task_zip(colours, 6, seed))}
            )
            assert response.status_code == 202, response.text
            submitted.append(response.json())
        jobs = [
            wait_json(
                client,
                f"/jobs/{s['job_id']}",
                lambda b: b["state"] in ("succeeded", "failed", "cancelled"),
                timeout=60,
            )
            for s in submitted
        ]
        assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], (
            jobs,
            worker.log()[-3000:],
        )
        first, second = (j["version_id"] for j in jobs)
        version = client.get(f"/versions/{second}").json()
        assert version["parent_id"] == first and version["class_count"] == 4
        assert version["active"] is True

        wait_json(client, "/readyz", lambda b: b["version_id"] == second, timeout=30)
        images = colour_images([0, 3], 1, seed=5)[0]
        files = []
        for i, image in enumerate(images):
            data = io.BytesIO()
            image.save(data, format="PNG")
            files.append(("images", (f"{i}.png", data.getvalue(), "image/png")))
        prediction = client.post("/predict", files=files, params={"top_k": 4})
        assert prediction.status_code == 200, prediction.text
        body = prediction.json()
        assert body["version_id"] == second
        for item in body["predictions"]:
            assert {c["name"] for c in item["classes"]} == {"red", "green", "blue", "yellow"}

        metrics = client.get("/metrics").text
        assert 'dmc_jobs{state="succeeded"} 2.0' in metrics
