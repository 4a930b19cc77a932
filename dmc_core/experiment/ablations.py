"""Ablation switches plugged into dmc_core's registries from outside the learner.

- calibrator `"none"`: leaves the Gaussian memory as it is, so `dmc_ot` with
  `calibration.method: none` is DMC-OT without its part (a) (task tokens only), e.g.
  `--set method_overrides.dmc_ot.calibration.method=none`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmc_core.calibration import CalibrationReport, Calibrator, register_calibrator
from dmc_core.memory import GaussianMemory

__all__ = ["NoCalibration"]


@register_calibrator("none")
@dataclass
class NoCalibration(Calibrator):
    """Moves nothing (an ablation of DMC-OT's optimal-transport calibration)."""

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        n = len(memory)
        zeros = torch.zeros(n, dtype=torch.float64)
        return CalibrationReport(self.name, memory.class_indices, zeros, zeros.clone(), None)
