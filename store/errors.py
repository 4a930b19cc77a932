"""Exceptions raised by the store. Every one derives from `StoreError`."""

from __future__ import annotations

from collections.abc import Iterable


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class VersionNotFoundError(StoreError, LookupError):
    def __init__(self, version_id: int) -> None:
        super().__init__(f"model version {version_id} does not exist")
        self.version_id = version_id


class EvaluationSetNotFoundError(StoreError, LookupError):
    def __init__(self, set_id: int) -> None:
        super().__init__(f"evaluation set {set_id} does not exist")
        self.set_id = set_id


class VersionInUseError(StoreError):
    """A version cannot be deleted: an alias points at it or other versions build on it."""

    def __init__(self, version_id: int, reason: str) -> None:
        super().__init__(f"model version {version_id} cannot be deleted: {reason}")
        self.version_id = version_id
        self.reason = reason


class StaleParentError(StoreError):
    """`publish(..., require_newest_parent=True)` found a newer version than the parent."""

    def __init__(self, parent_id: int | None, newest_id: int | None) -> None:
        super().__init__(
            f"the state was built on version {parent_id}, but the newest version is "
            f"{newest_id}; rebuild it on the newest version"
        )
        self.parent_id = parent_id
        self.newest_id = newest_id


class DuplicateClassError(StoreError):
    """Class names are unique within a version (so within the lineage a task builds on)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = sorted(set(names))
        super().__init__(f"these classes already exist: {', '.join(self.names)}")


class ClassNotFoundError(StoreError, LookupError):
    """A task names classes that the version it builds on does not have."""

    def __init__(self, names: Iterable[str], version_id: int | None = None) -> None:
        self.names = sorted(set(names))
        self.version_id = version_id
        where = f"version {version_id}" if version_id is not None else "the version built on"
        super().__init__(
            f"no class named {', '.join(map(repr, self.names))} in {where}; GET /classes "
            "lists the active version's classes"
        )


class ClassBusyError(StoreError):
    """A queued task already removes or renames a class that a new task names."""

    def __init__(self, busy: dict[str, int]) -> None:
        self.busy = dict(sorted(busy.items()))
        listed = ", ".join(f"{n!r} (task {t})" for n, t in self.busy.items())
        super().__init__(
            f"queued tasks remove or rename these classes: {listed}; wait for their jobs "
            "(GET /jobs), then submit again"
        )


class ClassesTakenError(DuplicateClassError):
    """A new task brings class names that a version has learned or a queued task brings."""

    def __init__(self, learned: Iterable[str], pending: dict[str, int]) -> None:
        self.learned = sorted(set(learned))
        self.pending = dict(sorted(pending.items()))
        super().__init__([*self.learned, *self.pending])
        parts = [f"{n!r} (learned)" for n in self.learned]
        parts += [f"{n!r} (queued in task {t})" for n, t in self.pending.items()]
        self.args = (
            f"these classes already exist: {', '.join(parts)}; class names are unique within "
            "a version, so upload these images under new names, or give a known class more "
            "images with POST /classes/{name}/images (GET /classes lists the classes)",
        )


class ObjectNotFoundError(StoreError, LookupError):
    def __init__(self, key: str) -> None:
        super().__init__(f"no object at {key!r}")
        self.key = key


class ObjectIntegrityError(StoreError):
    """An object's content does not match the sha256 recorded for it."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(
            f"object {key!r} is corrupt: sha256 {actual} instead of the recorded {expected}"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


class StateIntegrityError(StoreError):
    """A version's stored state is missing a blob or a blob was altered; it is refused."""

    def __init__(self, version_id: int, detail: str) -> None:
        super().__init__(f"the state of model version {version_id} is refused: {detail}")
        self.version_id = version_id
        self.detail = detail


class TaskNotFoundError(StoreError, LookupError):
    def __init__(self, task_id: int) -> None:
        super().__init__(f"task {task_id} does not exist")
        self.task_id = task_id


class JobNotFoundError(StoreError, LookupError):
    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} does not exist")
        self.job_id = job_id


class JobStateError(StoreError):
    """A job transition that its current state does not allow (e.g. cancelling a finished job)."""

    def __init__(self, job_id: int, state: str, action: str) -> None:
        super().__init__(f"job {job_id} is {state}; it cannot be {action}")
        self.job_id = job_id
        self.state = state
        self.action = action


class LeaseLostError(StoreError):
    """A job run that is no longer the current one: another run claimed the job, or the
    recovery requeued or failed it after the run's lease expired. The run must stop."""

    def __init__(self, job_id: int, attempt: int, current: int) -> None:
        super().__init__(
            f"run {attempt} of job {job_id} no longer owns the job (current run: {current})"
        )
        self.job_id = job_id
        self.attempt = attempt
        self.current = current


class IdempotencyConflictError(StoreError):
    """An idempotency key was reused for a different upload."""

    def __init__(self, key: str, task_id: int) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used by task {task_id} for a different "
            "upload (other classes, image counts or images); use a new key for a new upload"
        )
        self.key = key
        self.task_id = task_id
