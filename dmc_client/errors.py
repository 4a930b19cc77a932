"""The client's errors: one class per kind of refusal, each carrying the server's message."""

from __future__ import annotations

import httpx


class DmcClientError(Exception):
    """Base class of every error the client raises."""


class ConnectionFailedError(DmcClientError):
    """The server could not be reached (or did not answer in time)."""


class ApiError(DmcClientError):
    """The server answered with an error status; `message` is its `detail`."""

    def __init__(self, status_code: int, message: str, response: httpx.Response) -> None:
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.response = response


class InvalidRequestError(ApiError):
    """400, 415 or 422: the request (e.g. an upload) is not acceptable as sent."""


class AuthenticationError(ApiError):
    """401: no API key, or not a valid one."""


class PermissionDeniedError(ApiError):
    """403: the API key lacks the scope the call needs."""


class NotFoundError(ApiError):
    """404: no such version, job or evaluation set."""


class ConflictError(ApiError):
    """409: e.g. class names already learned or queued."""


class PayloadTooLargeError(ApiError):
    """413: an upload over the server's limits."""


class ServiceUnavailableError(ApiError):
    """503: busy or its database/object store is unreachable; retry after `retry_after`."""

    @property
    def retry_after(self) -> float | None:
        value = self.response.headers.get("Retry-After")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None


class JobFailedError(DmcClientError):
    """A job that was waited for failed or was cancelled; `job.error` says why."""

    def __init__(self, job: object, message: str) -> None:
        super().__init__(message)
        self.job = job


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: InvalidRequestError,
    422: InvalidRequestError,
    503: ServiceUnavailableError,
}


def api_error(response: httpx.Response) -> ApiError:
    """The typed error of an error response, with the server's message."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    message = detail if isinstance(detail, str) else (response.text or response.reason_phrase)
    return _BY_STATUS.get(response.status_code, ApiError)(response.status_code, message, response)
