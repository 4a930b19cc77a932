"""The one interface the server enqueues through, whichever dispatcher runs the jobs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import TracebackType
from typing import Self

from store.jobs import JobInfo
from store.service import Store


class Dispatcher(ABC):
    """Announces jobs to whatever runs them. Jobs live in the store: `submit` a job after
    `store.jobs.submit` has recorded it; a lost announcement only delays it until a
    worker's next sweep."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def start(self) -> None:
        """Begin running jobs, if this dispatcher runs them itself. Idempotent."""
        return None

    @abstractmethod
    def submit(self, job_id: int) -> None:
        """Announce a queued job."""

    def cancel(self, job_id: int) -> JobInfo:
        """Cancel a queued or running job: a queued one is `cancelled` at once; a running
        one is too, and its runner stops at its next progress report without publishing.
        Raises `JobStateError` for a finished job, `JobNotFoundError` for an unknown one."""
        info = self.store.jobs.cancel(job_id)
        # Wake a runner: it releases the uploads of the cancelled task.
        self.submit(job_id)
        return info

    def close(self, timeout: float | None = None) -> None:
        """Stop (the embedded thread hands its running job back to the queue)."""
        return None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
