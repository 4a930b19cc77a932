"""Toy tasks, settings and waiting for the worker tests."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dmc_core.backbone import load_backbone, save_checkpoint
from store.jobs import JobInfo, Submission
from store.models import JobState, TaskKind
from store.service import Store
from store.uploads import UploadedImage
from tests.core.toy import COLOUR_NAMES, colour_images
from worker.settings import WorkerSettings

T = TypeVar("T")

# Stage 1 with batches of one image: a job's length grows with its image count, so a
# task of 2 x 6 images takes a fraction of a second and one of 2 x 150 several seconds.
LEARNER_OVERRIDES: dict[str, Any] = {
    "stage1.epochs": 2,
    "stage1.batch_size": 1,
    "stage2.epochs": 2,
    "stage2.batch_size": 32,
    "stage2.lr": 0.01,
    "stage2.samples_per_old_class": 16,
    "calibration.samples_per_class": 16,
    "feature_batch_size": 64,
}
SHORT = 6  # images per class of a quick task
LONG = 150  # images per class of a task that runs for seconds

FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def make_checkpoint(path: Path) -> Path:
    """One random initialisation of the tiny ViT, so every process loads the same model."""
    import torch

    torch.manual_seed(0)
    save_checkpoint(load_backbone("dmc-tiny-vit").model, path)
    return path


def settings_env(
    *,
    database_url: str,
    objects_dir: Path,
    checkpoint: Path,
    lease_seconds: float = 3.0,
    **extra: str,
) -> dict[str, str]:
    """The DMC_* environment of a test worker."""
    import json

    env = {
        "DMC_DATABASE_URL": database_url,
        "DMC_OBJECTS_DIR": str(objects_dir),
        "DMC_BACKBONE_NAME": "dmc-tiny-vit",
        "DMC_BACKBONE_CHECKPOINT": str(checkpoint),
        "DMC_DEVICE": "cpu",
        "DMC_LEARNER_OVERRIDES": json.dumps(LEARNER_OVERRIDES),
        "DMC_JOB_LEASE_SECONDS": str(lease_seconds),
        "DMC_JOB_SWEEP_SECONDS": "2",
        "DMC_JOB_PROGRESS_INTERVAL_SECONDS": "0.1",
        "DMC_MAX_IMAGE_SIDE": "64",
        # Off: with no work_dir the collector would look through the system's temp dir.
        "DMC_GC_INTERVAL_SECONDS": "0",
    }
    env.update(extra)
    return env


def make_settings(
    *, database_url: str, objects_dir: Path, checkpoint: Path, **overrides: Any
) -> WorkerSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "objects_dir": objects_dir,
        "backbone_name": "dmc-tiny-vit",
        "backbone_checkpoint": str(checkpoint),
        "device": "cpu",
        "learner_overrides": dict(LEARNER_OVERRIDES),
        "job_lease_seconds": 3.0,
        "job_sweep_seconds": 2.0,
        "job_progress_interval_seconds": 0.1,
        "max_image_side": 64,
        # Off: with no work_dir the collector would look through the system's temp dir.
        "gc_interval_seconds": 0.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def submit_task(
    store: Store,
    colours: list[int],
    per_class: int = SHORT,
    *,
    seed: int = 0,
    activate: bool = True,
    broken: int = 0,
    names: list[str] | None = None,
    kind: TaskKind = TaskKind.ADD,
    base_version_id: int | None = None,
) -> Submission:
    """Upload a toy task (noisy solid colours; `colours` index tests.core.toy.COLOURS) and
    record it with its queued job. `broken` images of the first class are not images;
    `kind=TaskKind.EXTEND` gives known classes more images."""
    class_names = names or [COLOUR_NAMES[c] for c in colours]
    images, labels = colour_images(colours, per_class, seed)
    uploads = [
        UploadedImage(class_names[label], f"{class_names[label]}-{i}.png", png(image))
        for i, (image, label) in enumerate(zip(images, labels, strict=True))
    ]
    for i in range(broken):
        uploads.append(UploadedImage(class_names[0], f"broken-{i}.jpg", b"\xff\xd8 not a jpeg"))
    counts = [sum(1 for u in uploads if u.class_name == n) for n in class_names]
    location = store.uploads.save(uploads)
    return store.jobs.submit(
        class_names=class_names,
        image_counts=counts,
        uploads_location=location,
        activate=activate,
        kind=kind,
        base_version_id=base_version_id,
    )


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Poll until `condition()` returns something truthy and return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


def wait_finished(
    store: Store,
    job_ids: list[int],
    *,
    timeout: float = 90.0,
    watch: Callable[[], None] | None = None,
    progress: dict[int, list[float]] | None = None,
    message: Callable[[], str] | None = None,
) -> list[JobInfo]:
    """Wait until the jobs are finished; on each poll call `watch()` and record each job's
    percent into `progress`."""

    def done() -> list[JobInfo] | None:
        if watch is not None:
            watch()
        infos = [store.jobs.get(i) for i in job_ids]
        if progress is not None:
            for info in infos:
                progress.setdefault(info.id, []).append(info.progress.percent)
        return infos if all(i.state in FINISHED for i in infos) else None

    return wait_for(
        done,
        timeout=timeout,
        message=message or (lambda: f"jobs {job_ids}: {[store.jobs.get(i) for i in job_ids]}"),
    )


def wait_running(
    store: Store, job_id: int, *, stage: str = "stage1", timeout: float = 60
) -> JobInfo:
    """Wait until the job reports progress inside `stage` (it is well under way)."""

    def running() -> JobInfo | None:
        info = store.jobs.get(job_id)
        assert info.state not in FINISHED, f"job {job_id} finished before it was seen running"
        ok = info.state is JobState.RUNNING and info.progress.stage == stage
        return info if ok and info.progress.step >= 2 else None

    return wait_for(running, timeout=timeout, interval=0.02, message=f"job {job_id} in {stage}")


def assert_grows(series: list[float]) -> None:
    assert series == sorted(series), f"progress went back: {series}"


def settings_for(tmp_path: Path, checkpoint: Path, **overrides: object) -> WorkerSettings:
    """Settings on a SQLite file and a local object folder under `tmp_path`."""
    return make_settings(
        database_url=f"sqlite:///{tmp_path / 'dmc.sqlite'}",
        objects_dir=tmp_path / "objects",
        checkpoint=checkpoint,
        **overrides,
    )
