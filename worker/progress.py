"""One overall percentage for a job, from the learner's per-stage (step, total) reports.

A job goes through: load (state and images), the learner's stages, save, publish. The
learner reports `progress(stage, step, total)` for "encode", "stage1", "memory" and
"stage2"; "encode" comes twice with DMC-OT once old classes exist (before stage 1 with the
old encoder, after it with the new one). Each stage gets a fixed share of the learning
span, so the percentage only grows even though each stage's total is known only when the
stage starts.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmc_core.learner import Learner

# Shares of the learning span: stage 1 (forward and backward through the image tower,
# several epochs) dominates; stage 2 works on cached features.
STAGE_WEIGHTS: dict[str, float] = {"encode": 5.0, "stage1": 70.0, "memory": 5.0, "stage2": 15.0}
LOAD_PERCENT = 0.0
LEARN_START = 2.0
SAVE_PERCENT = 95.0
PUBLISH_PERCENT = 97.0


def learning_stages(learner: Learner) -> list[str]:
    """The stages `learner.learn_task` will report, in order (see dmc_core.learner)."""
    config = learner.config
    stages = []
    if config.uses_calibration and len(learner.memory) > 0:
        stages.append("encode")
    if config.stage1.epochs > 0:
        stages.append("stage1")
    stages += ["encode", "memory"]
    if config.stage2.epochs > 0:
        stages.append("stage2")
    return stages


class ProgressTracker:
    """Maps `(stage, step, total)` reports onto `start`..`end` percent, never going back."""

    def __init__(
        self, stages: Sequence[str], *, start: float = LEARN_START, end: float = SAVE_PERCENT
    ) -> None:
        if not start <= end:
            raise ValueError("start must not be above end")
        self.stages = list(stages)
        weights = [STAGE_WEIGHTS.get(s, 5.0) for s in self.stages]
        scale = (end - start) / sum(weights) if weights else 0.0
        self._starts: list[float] = []
        position = start
        for weight in weights:
            self._starts.append(position)
            position += weight * scale
        self._spans = [w * scale for w in weights]
        self._cursor = -1
        self._step = 0
        self.percent = start

    def update(self, stage: str, step: int, total: int) -> float:
        """The overall percentage after this report (unchanged for a stage not planned)."""
        if not (
            0 <= self._cursor < len(self.stages)
            and self.stages[self._cursor] == stage
            and step > self._step
        ):
            # A new stage, or the same name again once a stage restarts its count
            # (the second "encode").
            following = [
                i for i in range(self._cursor + 1, len(self.stages)) if self.stages[i] == stage
            ]
            if not following:
                return self.percent
            self._cursor = following[0]
        self._step = step
        fraction = min(1.0, step / total) if total > 0 else 0.0
        percent = self._starts[self._cursor] + self._spans[self._cursor] * fraction
        self.percent = max(self.percent, percent)
        return self.percent
