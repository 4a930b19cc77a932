"""SQLAlchemy models: the store's tables. `migrations/` must build exactly this schema."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from store.names import MAX_NAME_LENGTH

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ACTIVE_ALIAS = "active"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database (SQLite keeps no offset)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class TaskKind(enum.StrEnum):
    """What a task changes: new classes, more images of known ones, a removal, a rename."""

    ADD = "add"
    EXTEND = "extend"
    REMOVE = "remove"
    RENAME = "rename"


# A job in one of these states still has to run (or finish running).
PENDING_STATES = (JobState.QUEUED, JobState.RUNNING)


JOB_STATE_TYPE = Enum(
    JobState,
    name="job_state",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=lambda states: [s.value for s in states],
)


TASK_KIND_TYPE = Enum(
    TaskKind,
    name="task_kind",
    native_enum=False,
    create_constraint=True,
    length=16,
    values_callable=lambda kinds: [k.value for k in kinds],
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Version(Base):
    """An immutable model state. Its blobs live under `state_location` in the object store."""

    __tablename__ = "versions"
    # Without AUTOINCREMENT SQLite would hand a deleted newest id out again.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", ondelete="RESTRICT"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    class_count: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    state_location: Mapped[str] = mapped_column(String(512), unique=True)
    # sha256 over the sorted (file name, file sha256) pairs; see store.checksums.
    checksum: Mapped[str] = mapped_column(String(64))
    # {file name: {"sha256": hex, "size": bytes}}
    files: Mapped[dict[str, Any]] = mapped_column(JSON)
    # What it changed against its parent: `store.lineage.ClassChange.as_json()`.
    change: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class ClassRecord(Base):
    """A class of a version: every version lists all its classes (names are unique within
    a version, so within a lineage, not across abandoned branches)."""

    __tablename__ = "classes"
    __table_args__ = (UniqueConstraint("version_id", "name", name="uq_classes_version_id_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    # Position among the version's classes: the learner's label order.
    ordinal: Mapped[int] = mapped_column(Integer)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )
    # The task that brought the class, and the version that first learned it.
    task_id: Mapped[int | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="SET NULL"), index=True
    )
    since_version_id: Mapped[int | None] = mapped_column(Integer)


class Task(Base):
    """One change of the class set: an upload of new classes or of more images of known
    ones, a removal or a rename (`kind`)."""

    __tablename__ = "tasks"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(MAX_NAME_LENGTH), unique=True)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    image_counts: Mapped[list[int]] = mapped_column(JSON)
    # Prefix of the uploaded images in the object store; None once they are deleted.
    uploads_location: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Whether the version learned from this task becomes `active` when it is published.
    activate: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
    # sha256 over the upload's (class, image sha256) pairs: an idempotency key replayed
    # with other images (same classes and counts) is a conflict. None: not recorded.
    payload_digest: Mapped[str | None] = mapped_column(String(64))
    # This upload's promotion gate (`store.evaluations.GateRule` as JSON) in place of the
    # settings' one; None: the settings decide.
    gate: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    kind: Mapped[TaskKind] = mapped_column(
        TASK_KIND_TYPE, default=TaskKind.ADD, server_default="add"
    )
    # The version its job builds on; None: the one active when the job starts.
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", ondelete="SET NULL")
    )
    # Kind-specific arguments, e.g. {"name": new name} of a rename.
    arguments: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Job(Base):
    """The background run that turns a task into a version."""

    __tablename__ = "jobs"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    state: Mapped[JobState] = mapped_column(JOB_STATE_TYPE, index=True, default=JobState.QUEUED)
    # {"stage": str, "step": int, "total": int, "percent": float}
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("versions.id", ondelete="SET NULL"), index=True
    )
    # While running: until when the runner's heartbeat vouches for it. `worker`: who made
    # the latest run. `attempts` doubles as the fencing token of the current run (see
    # `Jobs.claim_next`).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(MAX_NAME_LENGTH))
    # What a succeeded job tells beyond its version, e.g. why the promotion gate kept the
    # version from becoming active.
    note: Mapped[str | None] = mapped_column(Text)


class Alias(Base):
    """A named pointer at a version; `active` is the one the server serves."""

    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="RESTRICT"), index=True
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GarbageCount(Base):
    """What the scheduled garbage collection removed, by kind, over all processes."""

    __tablename__ = "garbage_counts"

    # "objects" (unreferenced blobs and uploads) or "scratch_folders" (`dmc-job-*`).
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    total: Mapped[int] = mapped_column(BigInteger, default=0)
    # When the latest collection of this kind ran (anywhere).
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class EvaluationSet(Base):
    """One revision of a named, labelled image set that versions are evaluated on. Its
    images live under `location` in the object store (like a task's uploads)."""

    __tablename__ = "evaluation_sets"
    __table_args__ = (
        UniqueConstraint("name", "revision"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME_LENGTH), index=True)
    # 1, 2, ... per name: uploading a set under a taken name adds its next revision.
    revision: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    image_counts: Mapped[list[int]] = mapped_column(JSON)
    location: Mapped[str] = mapped_column(String(512), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Evaluation(Base):
    """A version's results on one evaluation set, against its parent on the same images."""

    __tablename__ = "evaluations"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(
        ForeignKey("versions.id", ondelete="CASCADE"), index=True
    )
    evaluation_set_id: Mapped[int] = mapped_column(
        ForeignKey("evaluation_sets.id", ondelete="CASCADE"), index=True
    )
    # The version compared against (the parent); None for a first version.
    baseline_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", ondelete="SET NULL"))
    # `worker.evaluation.SetResult` as JSON: accuracies overall, per class, old and new.
    results: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
