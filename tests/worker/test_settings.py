"""The worker's settings, from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from worker.settings import WorkerSettings


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
