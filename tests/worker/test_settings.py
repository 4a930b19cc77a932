"""The worker's settings, from the environment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from dmc_core.config import LearnerConfig
from worker.model import apply_schedule, base_config
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


def test_precision_and_determinism_apply_to_new_and_loaded_learners(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DMC_PRECISION", "bf16")
    monkeypatch.setenv("DMC_DETERMINISTIC", "true")
    monkeypatch.setenv("DMC_LEARNER_OVERRIDES", '{"loader_workers": 3}')
    settings = WorkerSettings()
    config = base_config(settings)
    assert (config.precision, config.deterministic, config.loader_workers) == ("bf16", True, 3)

    saved = LearnerConfig(precision="fp32", deterministic=False, loader_workers=0)
    learner = SimpleNamespace(config=saved)
    apply_schedule(learner, settings)  # type: ignore[arg-type]
    applied = learner.config
    assert (applied.precision, applied.deterministic, applied.loader_workers) == ("bf16", True, 3)
    with pytest.raises(ValidationError, match="DMC_DETERMINISTIC"):
        WorkerSettings(learner_overrides={"deterministic": True})
