"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from store.evaluations import EvaluationInfo, EvaluationSetInfo
from store.jobs import JobInfo, Submission
from store.models import JobState, TaskKind
from store.names import MAX_NAME_LENGTH
from store.registry import VersionInfo

Scope = Literal["predict", "admin"]

# The database's ids are INTEGER columns (32 bits on PostgreSQL): a larger id or offset is
# refused as invalid (422) instead of overflowing the driver.
DB_INT_MAX = 2**31 - 1


class ProgressOut(BaseModel):
    stage: str
    step: int
    total: int
    percent: float = Field(description="0 to 100; never goes down.")


class JobOut(BaseModel):
    id: int
    task_id: int
    state: JobState
    progress: ProgressOut
    error: str | None = Field(description="Why a failed job failed, and what to do about it.")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version_id: int | None = Field(description="The version a succeeded job published.")
    note: str | None = Field(
        default=None,
        description="What a succeeded job tells beyond its version: why the promotion "
        "gate kept the version from becoming active.",
    )

    @classmethod
    def of(cls, job: JobInfo) -> JobOut:
        return cls.model_validate(job, from_attributes=True)


class SubmissionOut(BaseModel):
    task_id: int
    job_id: int
    kind: TaskKind = Field(description="What the task changes.")
    class_names: list[str] = Field(
        description="The task's classes, in label order (a rename: the old name)."
    )
    image_counts: list[int] = Field(description="Images per class (none: remove, rename).")
    base_version_id: int | None = Field(
        description="The version it builds on; null: the one active when its job starts."
    )
    replayed: bool = Field(
        description="True when the Idempotency-Key was seen before: this is the first "
        "request's task and job, and nothing new was stored."
    )
    job: JobOut

    @classmethod
    def of(cls, submission: Submission, *, replayed: bool) -> SubmissionOut:
        return cls(
            task_id=submission.task.id,
            job_id=submission.job.id,
            kind=submission.task.kind,
            base_version_id=submission.task.base_version_id,
            class_names=list(submission.task.class_names),
            image_counts=list(submission.task.image_counts),
            replayed=replayed,
            job=JobOut.of(submission.job),
        )


class EvaluationSetOut(BaseModel):
    id: int
    name: str
    revision: int = Field(description="1, 2, ...: each upload under a name adds one.")
    class_names: list[str]
    image_counts: list[int]
    created_at: datetime

    @classmethod
    def of(cls, info: EvaluationSetInfo) -> EvaluationSetOut:
        return cls.model_validate(info, from_attributes=True)


class AccuracyOut(BaseModel):
    images: int
    correct: int
    accuracy: float | None = Field(description="Percent; None without images.")
    parent_correct: int | None
    parent_accuracy: float | None = Field(description="The parent's, on the same images.")
    change: float | None = Field(description="accuracy - parent_accuracy, in points.")


class ClassAccuracyOut(AccuracyOut):
    name: str
    old: bool = Field(description="The parent knew the class.")


class ConfusionOut(BaseModel):
    classes: list[str] = Field(description="The rows: the true classes.")
    predicted: list[str] = Field(
        description="The columns: the same classes, then `(other)` for any class outside."
    )
    counts: list[list[int]]


class EvaluationOut(BaseModel):
    evaluation_set: EvaluationSetOut
    baseline_id: int | None = Field(description="The version compared with (the parent).")
    created_at: datetime
    overall: AccuracyOut
    old: AccuracyOut = Field(description="Images of the classes the parent knew.")
    new: AccuracyOut = Field(description="Images of the classes this version added.")
    per_class: list[ClassAccuracyOut]
    confusion: ConfusionOut

    @classmethod
    def of(cls, info: EvaluationInfo) -> EvaluationOut:
        results = {k: v for k, v in info.results.items() if k != "evaluation_set"}
        return cls(
            evaluation_set=EvaluationSetOut.of(info.evaluation_set),
            baseline_id=info.baseline_id,
            created_at=info.created_at,
            **results,
        )


class VersionOut(BaseModel):
    id: int
    parent_id: int | None
    created_at: datetime
    class_count: int
    new_classes: list[str] = Field(description="The classes this version added.")
    change: dict[str, Any] = Field(
        description="What it changed against its parent: `kind` (add, extend, remove, "
        "rename), `classes`, and `renamed` (old name -> new name)."
    )
    metrics: dict[str, Any]
    size_bytes: int = Field(description="All its files, shared ones included.")
    added_bytes: int = Field(
        description="What storing it added: its files that no version stored before it did "
        "(versions share unchanged files)."
    )
    checksum: str
    active: bool
    evaluations: list[EvaluationOut] = Field(
        default_factory=list,
        description="Its newest results on each evaluation set, against its parent "
        "(GET /versions/{id} only; empty in lists).",
    )

    @classmethod
    def of(
        cls,
        info: VersionInfo,
        *,
        active_id: int | None,
        evaluations: Sequence[EvaluationInfo] = (),
    ) -> VersionOut:
        own = {"active", "evaluations"}
        fields = {name: getattr(info, name) for name in cls.model_fields if name not in own}
        return cls(
            **fields
            | {
                "new_classes": list(info.new_classes),
                "active": info.id == active_id,
                "evaluations": [EvaluationOut.of(e) for e in evaluations],
            }
        )


class ClassRename(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, description="The new name.")


class VersionsDeleted(BaseModel):
    deleted: list[int] = Field(
        description="The versions deleted: the one asked for and, "
        "with `cascade`, every version built on it."
    )


class ClassOut(BaseModel):
    name: str
    version_id: int = Field(description="The version that first learned the class.")
    task_id: int | None = Field(description="The task (upload) the class came in.")
    active: bool = Field(description="Whether the active version knows the class.")


class PredictJSON(BaseModel):
    images: list[str] = Field(min_length=1, description="Images as base64 (standard alphabet).")
    top_k: int | None = Field(default=None, ge=1, description="Overrides the query parameter.")
    version: int | None = Field(
        default=None, ge=1, le=DB_INT_MAX, description="Overrides the query parameter."
    )


class ClassScore(BaseModel):
    name: str
    probability: float


class ImagePrediction(BaseModel):
    filename: str | None
    classes: list[ClassScore] = Field(description="The top-k classes, most probable first.")


class PredictOut(BaseModel):
    version_id: int = Field(description="The version that answered.")
    predictions: list[ImagePrediction] = Field(description="One per image, in request order.")


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "degraded", "not ready"] = Field(
        description="`ready` and `degraded` (200): a version answers predictions. "
        "`degraded`: the database does not answer (`database`), or the active version "
        "failed to load and an older one answers (`error`)."
    )
    version_id: int | None = Field(description="The version answering unpinned requests.")
    active_version_id: int | None
    loading_version_id: int | None
    device: str | None = Field(
        default=None, description="Where the answering version runs (`cpu`, `cuda`, ...)."
    )
    database: bool = Field(description="The database answers (predict does not need it).")
    database_error: str | None = Field(
        default=None, description="Why the database does not answer (details: admin key)."
    )
    error: str | None
    reason: str | None = Field(default=None, description="Why the server is not ready.")


class ApiKeyCreate(BaseModel):
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    scopes: list[Scope] = Field(min_length=1)


class ApiKeyOut(BaseModel):
    id: int
    name: str
    scopes: list[Scope]
    created_at: datetime


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The key itself: shown only now, it cannot be read later.")


def links(status: int, **targets: tuple[str, dict[str, str]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links of a route's `status` response: each names an operation ("GET
    /jobs/{job_id}") and the JSON pointers in the response body its parameters come from."""
    out = {}
    for name, (operation, parameters) in targets.items():
        method, path = operation.split(" ", 1)
        pointer = path.replace("~", "~0").replace("/", "~1")
        out[name] = {
            "operationRef": f"#/paths/{pointer}/{method.lower()}",
            "parameters": {key: f"$response.body#/{ptr}" for key, ptr in parameters.items()},
        }
    return {status: {"links": out}}
