"""The worker's parts on their own: progress, images, settings, schedule, locks, Celery
configuration and the command."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import text
from typer.testing import CliRunner

from dmc_core.config import LearnerConfig
from dmc_core.state import save_state
from store.db import Database
from store.uploads import UploadedImage
from tests.worker.helpers import LEARNER_OVERRIDES, make_settings, png
from worker.celery_app import TASK_NAME, celery_config, create_app, worker_argv
from worker.errors import JobFailedError
from worker.images import decode_task_images
from worker.locking import AdvisoryLock, FileLock, LockLostError, ProcessLock, make_update_lock
from worker.model import build_base_learner, load_learner
from worker.progress import LEARN_START, SAVE_PERCENT, ProgressTracker, learning_stages
from worker.settings import WorkerSettings


def settings_for(tmp_path: Path, checkpoint: Path, **overrides: object) -> WorkerSettings:
    return make_settings(
        database_url=f"sqlite:///{tmp_path / 'dmc.sqlite'}",
        objects_dir=tmp_path / "objects",
        checkpoint=checkpoint,
        **overrides,
    )


# --- progress --------------------------------------------------------------------------


def test_progress_over_the_stages_of_dmc_ot_only_grows() -> None:
    stages = ["encode", "stage1", "encode", "memory", "stage2"]
    tracker = ProgressTracker(stages)
    reports = [("encode", 1, 2), ("encode", 2, 2)]
    reports += [("stage1", s, 10) for s in range(1, 11)]
    reports += [("encode", 1, 1), ("memory", 1, 1)]
    reports += [("stage2", s, 4) for s in range(1, 5)]
    seen = [tracker.update(*r) for r in reports]
    assert seen == sorted(seen)
    assert seen[0] > LEARN_START and seen[-1] == pytest.approx(SAVE_PERCENT)
    # The second "encode" is its own stage: it starts past the end of stage 1.
    assert seen[12] > seen[11]
    # A stage that is not planned, or one from the past, changes nothing.
    assert tracker.update("surprise", 1, 1) == seen[-1]
    assert tracker.update("stage1", 1, 10) == seen[-1]


def test_learning_stages_follow_the_learner(tmp_path: Path, checkpoint: Path) -> None:
    settings = settings_for(tmp_path, checkpoint)
    learner = build_base_learner(settings)
    assert learning_stages(learner) == ["stage1", "encode", "memory", "stage2"]
    learner.config = learner.config.with_overrides({"stage1.epochs": 0, "stage2.epochs": 0})
    assert learning_stages(learner) == ["encode", "memory"]


# --- images ----------------------------------------------------------------------------


def test_decoding_shrinks_large_images_and_keeps_labels() -> None:
    big = Image.new("L", (300, 150), color=128)
    uploads = [UploadedImage("b", "b.png", png(big)), UploadedImage("a", "a.png", png(big))]
    images, labels = decode_task_images(uploads, ["a", "b"], max_side=64)
    assert labels == [1, 0]
    assert [im.size for im in images] == [(64, 32), (64, 32)]
    assert all(im.mode == "RGB" for im in images)
    kept, _ = decode_task_images(uploads[:1], ["b"], max_side=0)
    assert kept[0].size == (300, 150)


def test_decoding_names_every_bad_file_and_what_to_do() -> None:
    good = png(Image.new("RGB", (8, 8)))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[:40]
    uploads = [
        UploadedImage("cat", "ok.png", good),
        UploadedImage("cat", "notes.txt", b"hello"),
        UploadedImage("dog", "cut.jpg", truncated),
    ]
    with pytest.raises(JobFailedError) as caught:
        decode_task_images(uploads, ["cat", "dog"])
    message = str(caught.value)
    assert message.startswith("2 of the 3 uploaded images cannot be decoded")
    assert "'notes.txt' (class 'cat')" in message and "'cut.jpg' (class 'dog')" in message
    assert "JPEG, PNG or WebP" in message
    with pytest.raises(JobFailedError, match="labelled 'owl', which is not one of"):
        decode_task_images([UploadedImage("owl", "o.png", good)], ["cat"])


# --- settings and the learner ----------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMC_LEARNER_OVERRIDES", '{"stage1.epochs": 5, "method": "dmc"}')
    monkeypatch.setenv("DMC_DISPATCHER", "celery")
    monkeypatch.setenv("DMC_BROKER_URL", "redis://redis:6379/2")
    monkeypatch.setenv("DMC_JOB_LEASE_SECONDS", "120")
    monkeypatch.setenv("DMC_BACKBONE_CHECKPOINT", "/models/base.pt")
    settings = WorkerSettings()
    assert settings.learner_overrides == {"stage1.epochs": 5, "method": "dmc"}
    assert settings.dispatcher == "celery"
    assert settings.broker_url == "redis://redis:6379/2"
    assert settings.job_lease_seconds == 120
    assert settings.backbone_checkpoint == "/models/base.pt"
    assert settings.database_url.startswith("sqlite")  # the store's settings are there too


def test_settings_refuse_unknown_or_misplaced_learner_keys() -> None:
    with pytest.raises(ValidationError, match=r"unknown config key 'stage1\.epoch'"):
        WorkerSettings(learner_overrides={"stage1.epoch": 1})
    with pytest.raises(ValidationError, match="DMC_DEVICE"):
        WorkerSettings(learner_overrides={"device": "cuda"})
    with pytest.raises(ValidationError):
        WorkerSettings(dispatcher="threads")  # type: ignore[arg-type]


def test_a_loaded_learner_takes_the_schedule_but_not_the_structure(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = build_base_learner(settings_for(tmp_path, checkpoint))
    assert base.config.stage1.epochs == LEARNER_OVERRIDES["stage1.epochs"]
    save_state(base, tmp_path / "state")
    later = settings_for(
        tmp_path,
        checkpoint,
        learner_overrides={"stage1.epochs": 7, "adapter.rank": 4},
        min_images_per_class=3,
    )
    with caplog.at_level(logging.WARNING):
        learner = load_learner(tmp_path / "state", later)
    assert learner.config.stage1.epochs == 7
    assert learner.config.adapter.rank == LearnerConfig().adapter.rank
    assert learner.config.min_images_per_class == 3
    assert "adapter.rank=4 is ignored" in caplog.text


# --- locks -----------------------------------------------------------------------------


def test_file_lock_has_one_holder_and_dies_with_it(tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    first.check()
    first.release()
    with pytest.raises(LockLostError):
        first.check()
    assert second.acquire()
    second.release()


def test_process_lock_for_in_memory_sqlite() -> None:
    db = Database.from_url("sqlite://")
    first, second = make_update_lock(db), make_update_lock(db)
    assert isinstance(first, ProcessLock)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    db.dispose()


def test_advisory_lock_on_postgresql(postgres_url: str) -> None:
    db = Database.from_url(postgres_url)
    try:
        first, second = make_update_lock(db), make_update_lock(db)
        assert isinstance(first, AdvisoryLock) and isinstance(second, AdvisoryLock)
        assert first.acquire() and not second.acquire()
        first.check()
        first.release()
        assert second.acquire()
        # The holder's connection dies (a killed worker): the lock is free again and the
        # holder finds out at its next check.
        connection = second._connection
        assert connection is not None
        with db.engine.connect() as admin:
            pid = connection.scalar(text("SELECT pg_backend_pid()"))
            connection.commit()
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(LockLostError):
            second.check()
        second.release()
        assert first.acquire()
        first.release()
    finally:
        db.dispose()


# --- Celery and the command ------------------------------------------------------------


def test_celery_is_set_up_for_long_jobs(tmp_path: Path, checkpoint: Path) -> None:
    settings = settings_for(tmp_path, checkpoint, celery_queue="updates")
    config = celery_config(settings)
    assert config["worker_pool"] == "solo" and config["worker_concurrency"] == 1
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_acks_late"] is False
    assert config["broker_transport_options"]["visibility_timeout"] >= 3600
    argv = worker_argv(settings, hostname="n@h")
    assert {"--pool=solo", "--concurrency=1", "--queues=updates", "--hostname=n@h"} <= set(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a task name registered twice
        apps = [create_app(settings, upgrade=False) for _ in range(2)]
    for app in apps:
        # Each app runs its own runtime's task (not one shared by every app).
        assert app.tasks[TASK_NAME].app is app
        assert app.conf.task_default_queue == "updates"
        assert app.conf.task_acks_late is False
        app.close()


def test_dmc_worker_command_is_there() -> None:
    from dmc_cli.main import app

    result = CliRunner().invoke(app, ["worker", "--help"])
    assert result.exit_code == 0
    assert "--queue" in result.output and "--no-upgrade" in result.output
