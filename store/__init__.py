"""The versioned model store: SQL rows (versions, classes, tasks, jobs, aliases, API keys),
blobs in an object store (local folder or S3), and the version registry."""

from store.api_keys import ApiKeyInfo, ApiKeys
from store.db import Database, make_engine, upgrade_database
from store.errors import (
    ClassesTakenError,
    DuplicateClassError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
    ObjectIntegrityError,
    ObjectNotFoundError,
    StaleParentError,
    StateIntegrityError,
    StoreError,
    TaskNotFoundError,
    VersionInUseError,
    VersionNotFoundError,
)
from store.jobs import JobInfo, Jobs, Progress, Submission
from store.models import ACTIVE_ALIAS, PENDING_STATES, JobState
from store.names import MAX_NAME_LENGTH
from store.objects import LocalObjectStore, ObjectStore, S3ObjectStore, make_object_store
from store.registry import Registry, StateSource, VersionInfo
from store.service import Store
from store.settings import StoreSettings
from store.tasks import ClassRow, TaskInfo, Tasks
from store.uploads import TaskUploads, UploadedImage

__all__ = [
    "ACTIVE_ALIAS",
    "MAX_NAME_LENGTH",
    "PENDING_STATES",
    "ApiKeyInfo",
    "ApiKeys",
    "ClassRow",
    "ClassesTakenError",
    "Database",
    "DuplicateClassError",
    "IdempotencyConflictError",
    "JobInfo",
    "JobNotFoundError",
    "JobState",
    "JobStateError",
    "Jobs",
    "LeaseLostError",
    "LocalObjectStore",
    "ObjectIntegrityError",
    "ObjectNotFoundError",
    "ObjectStore",
    "Progress",
    "Registry",
    "S3ObjectStore",
    "StaleParentError",
    "StateIntegrityError",
    "StateSource",
    "Store",
    "StoreError",
    "StoreSettings",
    "Submission",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskUploads",
    "Tasks",
    "UploadedImage",
    "VersionInUseError",
    "VersionInfo",
    "VersionNotFoundError",
    "make_engine",
    "make_object_store",
    "upgrade_database",
]
