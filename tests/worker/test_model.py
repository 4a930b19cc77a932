"""Learners from the settings and from the store."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from dmc_core.config import LearnerConfig
from dmc_core.state import StateError, load_state, save_state
from store.service import Store
from tests.worker.helpers import LEARNER_OVERRIDES, settings_for
from worker.errors import VersionMismatchError
from worker.model import apply_schedule, build_base_learner, load_version


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
        learner = load_state(tmp_path / "state", device="cpu", cache_dir=later.model_cache_dir)
        apply_schedule(learner, later)
    assert learner.config.stage1.epochs == 7
    assert learner.config.adapter.rank == LearnerConfig().adapter.rank
    assert learner.config.min_images_per_class == 3
    assert "adapter.rank=4 is ignored" in caplog.text


def test_a_version_becomes_a_learner_only_with_the_classes_the_registry_lists(
    tmp_path: Path, checkpoint: Path
) -> None:
    settings = settings_for(tmp_path, checkpoint)
    store = Store.open(settings, upgrade=True)
    try:
        save_state(build_base_learner(settings), tmp_path / "state")
        empty = store.registry.publish(tmp_path / "state", parent_id=None, new_classes=())
        learner = load_version(store.registry, empty.id, part="full", device="cpu", cache_dir=None)
        assert learner.class_names == []
        # A state published under classes it does not hold is refused.
        wrong = store.registry.publish(tmp_path / "state", parent_id=empty.id, new_classes=["owl"])
        with pytest.raises(VersionMismatchError, match=r"registry lists \['owl'\]"):
            load_version(store.registry, wrong.id, part="full", device="cpu", cache_dir=None)
    finally:
        store.close()


def test_a_version_on_a_backbone_with_other_weights_is_refused(
    tmp_path: Path, checkpoint: Path
) -> None:
    """Issue 14 (9): no pretrained tag and no checkpoint: each process initialises the
    backbone at random, under the same id. The weights digest in the manifest tells."""
    settings = settings_for(
        tmp_path, checkpoint, backbone_checkpoint=None, backbone_pretrained=None
    )
    store = Store.open(settings, upgrade=True)
    try:
        torch.manual_seed(1)  # the worker that learned the version
        save_state(build_base_learner(settings), tmp_path / "state")
        version = store.registry.publish(tmp_path / "state", parent_id=None, new_classes=())
        torch.manual_seed(2)  # another process: other random weights
        with pytest.raises(StateError, match=r"different weights.*DMC_BACKBONE_CHECKPOINT"):
            load_version(store.registry, version.id, part="full", device="cpu", cache_dir=None)
    finally:
        store.close()
