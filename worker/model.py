"""Learners from the settings and from the store: the base model a first job builds on,
and `load_version`, the one way a version becomes a `Learner` (jobs and the server)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from dmc_core.backbone import BackboneSpec, load_backbone
from dmc_core.config import LearnerConfig
from dmc_core.device import resolve_device
from dmc_core.learner import Learner
from dmc_core.state import load_state
from dmc_core.state_files import Part
from store.registry import Registry
from worker.errors import VersionMismatchError
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# Learner keys that may differ from task to task (the schedule); the others are fixed by
# the first version (they shape the saved state) and come from it afterwards.
SCHEDULE_PREFIXES = ("stage1.", "stage2.", "calibration.")
SCHEDULE_KEYS = frozenset({"feature_batch_size", "loader_workers"})


def backbone_spec(settings: WorkerSettings) -> BackboneSpec:
    return BackboneSpec(
        name=settings.backbone_name,
        pretrained=None if settings.backbone_checkpoint else settings.backbone_pretrained,
        checkpoint=settings.backbone_checkpoint,
        image_size=settings.backbone_image_size,
    )


def base_config(settings: WorkerSettings) -> LearnerConfig:
    config = LearnerConfig().with_overrides(settings.learner_overrides)
    config.device = resolve_device(settings.device)
    config.precision = settings.precision
    config.deterministic = settings.deterministic
    config.min_images_per_class = settings.min_images_per_class
    return config


def build_base_learner(settings: WorkerSettings) -> Learner:
    """A learner with no classes on the configured base model."""
    config = base_config(settings)
    backbone = load_backbone(
        backbone_spec(settings), device=config.device, cache_dir=settings.model_cache_dir
    )
    return Learner(backbone, config)


def load_version(
    registry: Registry,
    version_id: int,
    *,
    part: Part,
    device: str,
    cache_dir: Path | None,
    precision: str | None = None,
    folder: Path | None = None,
) -> Learner:
    """The learner of a version: its state's `part` ("inference": no Gaussian memory, for
    predicting; "full": to learn on) materialised from the store into `folder` (a
    temporary folder by default; removed afterwards), every blob checked, and loaded on
    `device` ("auto": a GPU if there is one), in `precision` when given (DMC_PRECISION
    applies whatever the state was saved with).

    Raises the store's and `dmc_core`'s errors when the state cannot be loaded, and
    `VersionMismatchError` when it holds other classes than the registry lists.
    """
    materialised = registry.load_state(version_id, folder, part=part)
    try:
        learner = load_state(
            materialised,
            part=part,
            device=resolve_device(device),
            precision=precision,
            cache_dir=cache_dir,
        )
    finally:
        shutil.rmtree(materialised, ignore_errors=True)
    listed = registry.class_names(version_id)
    if learner.class_names != listed:
        raise VersionMismatchError(version_id, learner.class_names, listed)
    return learner


def load_learner(
    registry: Registry, version_id: int, settings: WorkerSettings, folder: Path
) -> Learner:
    """The learner of a version to learn on: its full state, on this worker's device, with
    the settings' schedule."""
    learner = load_version(
        registry,
        version_id,
        part="full",
        device=settings.device,
        precision=settings.precision,
        cache_dir=settings.model_cache_dir,
        folder=folder,
    )
    apply_schedule(learner, settings)
    return learner


def apply_schedule(learner: Learner, settings: WorkerSettings) -> None:
    """Give a loaded learner the settings' schedule overrides, precision and minimum images
    per class; the other overrides cannot change once there is a state (logged)."""
    schedule: dict[str, Any] = {}
    saved = learner.config.to_dict()
    for key, value in settings.learner_overrides.items():
        if key.startswith(SCHEDULE_PREFIXES) or key in SCHEDULE_KEYS:
            schedule[key] = value
        elif _lookup(saved, key) != value:
            log.warning(
                "learner override %s=%r is ignored: the state was saved with %r, and only "
                "the schedule (stage1.*, stage2.*, calibration.*) can change between tasks",
                key,
                value,
                _lookup(saved, key),
            )
    config = learner.config.with_overrides(schedule)
    config.precision = settings.precision
    config.deterministic = settings.deterministic
    config.min_images_per_class = settings.min_images_per_class
    learner.config = config


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node
