"""Why a job stops before it publishes."""

from __future__ import annotations


class JobFailedError(Exception):
    """The job cannot succeed as given; the message tells the user what to do about it."""


class JobCancelledError(Exception):
    """The job was cancelled while it ran."""


class WorkerStoppingError(Exception):
    """The worker is shutting down; the job goes back to the queue for another run."""
