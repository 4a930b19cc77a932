"""`Client`: the HTTP API of a dmc server as typed method calls."""

from __future__ import annotations

import io
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import TypeAdapter
from tqdm import tqdm

from dmc_client.errors import (
    ConnectionFailedError,
    JobFailedError,
    ServiceUnavailableError,
    api_error,
)
from dmc_client.models import (
    ClassInfo,
    EvaluationSet,
    Job,
    Predictions,
    Submission,
    Version,
    VersionsDeleted,
)

API_KEY_HEADER = "X-API-Key"
ImageSource = str | Path | bytes | Any  # a path, encoded bytes, or a PIL image
# The longest pause before trying a busy server again, whatever its Retry-After says.
_MOST_WAIT_SECONDS = 10.0


class Client:
    """A dmc server at `url`, called with `api_key` (an `admin` key for changes).

    Every refusal raises a subclass of `dmc_client.ApiError` carrying the server's message;
    an unreachable server raises `ConnectionFailedError`. Reads and predictions answered
    503 (busy, a version loading) are tried again up to `retries_when_busy` times."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        poll_seconds: float = 0.5,
        retries_when_busy: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.poll_seconds = poll_seconds
        self.retries_when_busy = retries_when_busy
        self._http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- classes and jobs ---------------------------------------------------------------

    def add_classes(
        self,
        folder_or_archive: str | Path,
        *,
        wait: bool = True,
        progress: bool | None = True,
        activate: bool = True,
        gate_max_old_drop: float | None = None,
        gate_min_new_accuracy: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Upload new classes: a folder with one sub-folder of images per class, or a
        zip/tar archive laid out so. With `wait`, follow the job to its end (a progress
        bar on stderr with `progress`; None: only on a terminal) and raise
        `JobFailedError` if it fails or is cancelled; else return the queued job. The
        gate arguments override the server's promotion gate for this upload; a refused
        version is published but not active (`job.note` says why)."""
        data: dict[str, Any] = {"activate": str(activate).lower()}
        if gate_max_old_drop is not None:
            data["gate_max_old_drop"] = str(gate_max_old_drop)
        if gate_min_new_accuracy is not None:
            data["gate_min_new_accuracy"] = str(gate_min_new_accuracy)
        with _archive(Path(folder_or_archive)) as (name, archive):
            return self._submit(
                "POST",
                "/classes",
                wait=wait,
                progress=progress,
                idempotency_key=idempotency_key,
                files={"archive": (name, archive)},
                data=data,
            )

    def extend_class(
        self,
        name: str,
        folder_or_images: str | Path | Sequence[ImageSource],
        *,
        wait: bool = True,
        progress: bool | None = True,
        idempotency_key: str | None = None,
    ) -> Job:
        """Give a learned class more images (an archive or folder laid out as for
        `add_classes`, or image files/bytes/PIL images of the class): its statistics are
        merged with theirs and the prompts are trained, in a new version."""
        files: Any
        if isinstance(folder_or_images, str | Path):
            with _archive(Path(folder_or_images)) as (filename, archive):
                return self._submit(
                    "POST",
                    f"/classes/{name}/images",
                    wait=wait,
                    progress=progress,
                    idempotency_key=idempotency_key,
                    files={"archive": (filename, archive)},
                )
        files = [("images", _image_file(i, image)) for i, image in enumerate(folder_or_images)]
        return self._submit(
            "POST",
            f"/classes/{name}/images",
            wait=wait,
            progress=progress,
            idempotency_key=idempotency_key,
            files=files,
        )

    def remove_class(
        self, name: str, *, wait: bool = True, idempotency_key: str | None = None
    ) -> Job:
        """A new version without the class (predictions never return it again)."""
        return self._submit(
            "DELETE", f"/classes/{name}", wait=wait, progress=False, idempotency_key=idempotency_key
        )

    def rename_class(
        self, name: str, new_name: str, *, wait: bool = True, idempotency_key: str | None = None
    ) -> Job:
        """A new version whose prompts use `new_name`; the class's statistics are kept."""
        return self._submit(
            "PATCH",
            f"/classes/{name}",
            wait=wait,
            progress=False,
            idempotency_key=idempotency_key,
            json={"name": new_name},
        )

    def _submit(
        self,
        method: str,
        path: str,
        *,
        wait: bool,
        progress: bool | None,
        idempotency_key: str | None,
        **kwargs: Any,
    ) -> Job:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        submitted = self._call(Submission, method, path, headers=headers, **kwargs)
        return self.wait(submitted.job_id, progress=progress) if wait else submitted.job

    def wait(
        self, job_id: int, *, progress: bool | None = True, timeout: float | None = None
    ) -> Job:
        """Poll a job until it ends (a progress bar as for `add_classes`);
        `JobFailedError` unless it succeeded."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar_format = "{desc} |{bar}| {n:.0f}%"
        with tqdm(
            total=100, bar_format=bar_format, disable=None if progress is None else not progress
        ) as bar:
            while True:
                job = self.job(job_id)
                bar.set_description(f"job {job.id} {job.state} {job.progress.stage}")
                bar.n = job.progress.percent
                bar.refresh()
                if job.finished:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
                time.sleep(self.poll_seconds)
        if job.state != "succeeded":
            reason = job.error or "cancelled"
            raise JobFailedError(job, f"job {job.id} {job.state}: {reason}")
        return job

    def classes(self) -> list[ClassInfo]:
        """The active version's classes, in label order."""
        return self._call(list[ClassInfo], "GET", "/classes")

    def job(self, job_id: int) -> Job:
        return self._call(Job, "GET", f"/jobs/{job_id}")

    def jobs(self, *, state: str | None = None, limit: int = 100) -> list[Job]:
        params: dict[str, Any] = {"limit": limit} | ({"state": state} if state else {})
        return self._call(list[Job], "GET", "/jobs", params=params)

    def cancel(self, job_id: int) -> Job:
        return self._call(Job, "POST", f"/jobs/{job_id}/cancel")

    # --- predict ------------------------------------------------------------------------

    def predict(
        self, paths_or_images: Sequence[ImageSource], top_k: int = 5, version: int | None = None
    ) -> Predictions:
        """The top-k classes of each image (file paths, encoded bytes or PIL images), from
        the active version or a pinned `version`."""
        files = [("images", _image_file(i, source)) for i, source in enumerate(paths_or_images)]
        params: dict[str, Any] = {"top_k": top_k} | ({"version": version} if version else {})
        return self._call(Predictions, "POST", "/predict", files=files, params=params, retry=True)

    # --- versions -----------------------------------------------------------------------

    def versions(self, *, limit: int = 100) -> list[Version]:
        """Versions, newest first."""
        return self._call(list[Version], "GET", "/versions", params={"limit": limit})

    def version(self, version_id: int) -> Version:
        """One version, with its evaluations against its parent."""
        return self._call(Version, "GET", f"/versions/{version_id}")

    def activate(self, version_id: int) -> Version:
        """Make a version the active one (an older one: a rollback)."""
        return self._call(Version, "POST", f"/versions/{version_id}/activate")

    def delete_version(self, version_id: int, *, cascade: bool = False) -> list[int]:
        """Delete a version that is not active and that nothing builds on (with `cascade`,
        its whole subtree); the ids deleted."""
        deleted = self._call(
            VersionsDeleted,
            "DELETE",
            f"/versions/{version_id}",
            params={"cascade": str(cascade).lower()},
        )
        return list(deleted.deleted)

    def evaluate(self, version_id: int) -> Version:
        """Evaluate a version on the evaluation sets now; the version with the results."""
        return self._call(Version, "POST", f"/versions/{version_id}/evaluate")

    # --- evaluation sets ----------------------------------------------------------------

    def add_evaluation_set(self, name: str, folder_or_archive: str | Path) -> EvaluationSet:
        """Upload a labelled image set (laid out as for `add_classes`) under `name`; a
        name used before gets its next revision."""
        with _archive(Path(folder_or_archive)) as (filename, archive):
            return self._call(
                EvaluationSet,
                "POST",
                "/evaluation-sets",
                files={"archive": (filename, archive)},
                data={"name": name},
            )

    def evaluation_sets(self) -> list[EvaluationSet]:
        return self._call(list[EvaluationSet], "GET", "/evaluation-sets")

    # --- plumbing -----------------------------------------------------------------------

    def _call(
        self, model: Any, method: str, path: str, *, retry: bool = False, **kwargs: Any
    ) -> Any:
        """One request, its answer as `model`. A 503 (busy, a version loading) is tried
        again after its Retry-After when the request changes nothing (GET, predict)."""
        tries = self.retries_when_busy + 1 if retry or method == "GET" else 1
        for attempt in range(tries):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                raise ConnectionFailedError(
                    f"{method} {self._http.base_url}{path} failed: {error}"
                ) from error
            if not response.is_error:
                return TypeAdapter(model).validate_python(response.json())
            refusal = api_error(response)
            if not isinstance(refusal, ServiceUnavailableError) or attempt + 1 == tries:
                raise refusal
            time.sleep(min(refusal.retry_after or 1.0, _MOST_WAIT_SECONDS))
        raise AssertionError("unreachable")


@contextmanager
def _archive(source: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """An archive file as it is, or a folder zipped into a temporary file (so a large
    folder is never held in memory)."""
    if source.is_file():
        with source.open("rb") as handle:
            yield source.name, handle
        return
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is neither a folder of class folders nor an archive")
    with tempfile.TemporaryFile() as spool:
        with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED) as archive:
            for path in sorted(source.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    archive.write(path, path.relative_to(source).as_posix())
        spool.seek(0)
        yield f"{source.name or 'upload'}.zip", spool


def _image_file(index: int, source: ImageSource) -> tuple[str, bytes]:
    if isinstance(source, str | Path):
        path = Path(source)
        return path.name, path.read_bytes()
    if isinstance(source, bytes):
        return f"{index}", source
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")  # a PIL image
    return f"{index}.png", buffer.getvalue()
