"""What the server answers, as typed objects (fields the client does not know are ignored)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Progress(_Model):
    stage: str
    step: int
    total: int
    percent: float


class Job(_Model):
    id: int
    task_id: int
    state: str
    progress: Progress
    error: str | None = None
    note: str | None = None
    attempts: int
    version_id: int | None = None
    created_at: datetime
    finished_at: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


class Submission(_Model):
    task_id: int
    job_id: int
    class_names: list[str]
    image_counts: list[int]
    replayed: bool
    job: Job


class Accuracy(_Model):
    images: int
    correct: int
    accuracy: float | None
    parent_accuracy: float | None
    change: float | None


class ClassAccuracy(Accuracy):
    name: str
    old: bool


class EvaluationSet(_Model):
    id: int
    name: str
    revision: int
    class_names: list[str]
    image_counts: list[int]
    created_at: datetime


class Evaluation(_Model):
    evaluation_set: EvaluationSet
    baseline_id: int | None
    overall: Accuracy
    old: Accuracy
    new: Accuracy
    per_class: list[ClassAccuracy]
    confusion: dict[str, Any]


class Version(_Model):
    id: int
    parent_id: int | None
    created_at: datetime
    class_count: int
    new_classes: list[str]
    # What it changed against its parent: kind (add, extend, remove, rename) and classes.
    change: dict[str, Any] = {}
    metrics: dict[str, Any]
    size_bytes: int
    active: bool
    evaluations: list[Evaluation] = []

    @property
    def gate(self) -> dict[str, Any] | None:
        """The promotion gate's decision when the version was learned (None before it)."""
        gate = self.metrics.get("gate")
        return gate if isinstance(gate, dict) else None


class ClassScore(_Model):
    name: str
    probability: float


class ImagePrediction(_Model):
    filename: str | None
    classes: list[ClassScore]


class Predictions(_Model):
    version_id: int
    predictions: list[ImagePrediction]


class VersionsDeleted(_Model):
    deleted: list[int]


class ClassInfo(_Model):
    name: str
    version_id: int
    task_id: int | None
