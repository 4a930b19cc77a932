"""Progress of a job: the overall percent over the learner's stages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.worker.helpers import settings_for
from worker.model import build_base_learner
from worker.progress import LEARN_START, SAVE_PERCENT, ProgressTracker, learning_stages


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
