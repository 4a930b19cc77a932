"""The worker's errors; every one derives from `WorkerError`."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.exc import InterfaceError, OperationalError

# Errors of the database connection itself: a running job is left as it is (running)
# and run again once its lease expires.
CONNECTION_ERRORS = (OperationalError, InterfaceError)


class WorkerError(Exception):
    """Base class of every error the worker raises on purpose."""


class JobFailedError(WorkerError):
    """The job cannot succeed as given; the message tells the user what to do about it."""


class JobCancelledError(WorkerError):
    """The job was cancelled while it ran."""


class WorkerStoppingError(WorkerError):
    """The worker is shutting down; the job goes back to the queue for another run."""


class VersionMismatchError(WorkerError):
    """A version's saved state holds other classes than the registry lists for it."""

    def __init__(self, version_id: int, held: Sequence[str], listed: Sequence[str]) -> None:
        super().__init__(
            f"the state of version {version_id} holds the classes {held}, "
            f"but the registry lists {listed}; repair or delete that version"
        )
        self.version_id = version_id
