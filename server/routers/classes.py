"""GET /classes, POST /classes (a task: new classes with their images)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Response, UploadFile

from server.dependencies import AdminAccess, ReadAccess, Services, ServicesDep
from server.errors import UploadError, error, responses
from server.schemas import ClassOut, SubmissionOut
from server.uploads import (
    ParsedUpload,
    UploadLimits,
    parse_archive,
    parse_labelled_files,
)
from store.jobs import Submission
from store.names import MAX_NAME_LENGTH

log = logging.getLogger(__name__)

router = APIRouter(tags=["classes"])

REPLAYED_HEADER = "Idempotent-Replayed"


@router.get("/classes", response_model=list[ClassOut], responses=responses(401, 403))
async def list_classes(services: ServicesDep, _: ReadAccess) -> list[ClassOut]:
    """Every class a version has learned, with the task and version it arrived in."""
    store = services.store

    def read() -> list[ClassOut]:
        rows = store.tasks.learned_classes()
        active = store.registry.active()
        known = set(store.registry.class_names(active.id)) if active else set()
        return [
            ClassOut(
                name=r.name, version_id=r.version_id, task_id=r.task_id, active=r.name in known
            )
            for r in rows
        ]

    return await asyncio.to_thread(read)


def _parse(
    archive: UploadFile | None,
    images: list[UploadFile] | None,
    labels: list[str] | None,
    limits: UploadLimits,
) -> ParsedUpload:
    if archive is not None and images:
        raise UploadError(
            422, "send either an `archive` file or `images` files with `labels`, not both"
        )
    if archive is not None:
        if labels:
            raise UploadError(
                422,
                "`labels` go with `images` files; an archive names its classes by its folders",
            )
        return parse_archive(archive.file, limits)
    if images:
        return parse_labelled_files([(f.filename, f.file) for f in images], labels or [], limits)
    raise UploadError(
        422,
        "send an `archive` file (zip or tar with one folder per class) or `images` files "
        "with one `labels` field each",
    )


def _check(services: Services, key: str | None, parsed: ParsedUpload) -> Submission | None:
    """The earlier submission of `key` (a replay), or None after checking that no class
    of the upload is learned or queued already (409 otherwise)."""
    store = services.store
    if key is not None:
        earlier = store.jobs.replay(key, parsed.class_names, parsed.image_counts, parsed.digest)
        if earlier is not None:
            return earlier
    learned, pending = store.tasks.taken_class_names(parsed.class_names)
    if learned or pending:
        parts = [f"{n!r} (learned)" for n in learned]
        parts += [f"{n!r} (queued in task {t})" for n, t in sorted(pending.items())]
        raise error(
            409,
            f"these classes already exist: {', '.join(parts)}; class names are unique, "
            "so upload these images under new names (GET /classes lists the taken ones)",
        )
    return None


@router.post(
    "/classes",
    status_code=202,
    response_model=SubmissionOut,
    responses=responses(400, 401, 403, 409, 413, 422),
)
async def add_classes(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    archive: Annotated[
        UploadFile | None,
        File(
            description="A zip or tar archive (optionally .gz/.bz2/.xz) with one folder per "
            "class: `<class name>/<image>`, optionally all inside one top folder."
        ),
    ] = None,
    images: Annotated[
        list[UploadFile] | None,
        File(description="Image files; each needs a `labels` field, in the same order."),
    ] = None,
    labels: Annotated[
        list[str] | None, Form(description="The class name of each of the `images`.")
    ] = None,
    activate: Annotated[
        bool, Form(description="Make the learned version active when the job succeeds.")
    ] = True,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_NAME_LENGTH,
            description="Retry-safe submits: the same key with the same classes and image "
            "counts returns the first response; with others, 409.",
        ),
    ] = None,
) -> SubmissionOut:
    """Add new classes: a task. The images are validated (each bad file is a 4xx and
    nothing is stored), stored, and a job is queued that learns them into a new version.
    Answers 202 with the task and job; follow the job at GET /jobs/{job_id}."""
    store = services.store
    limits = UploadLimits.from_settings(services.settings)
    parsed = await asyncio.to_thread(_parse, archive, images, labels, limits)

    earlier = await asyncio.to_thread(_check, services, idempotency_key, parsed)
    if earlier is not None:
        response.headers[REPLAYED_HEADER] = "true"
        return SubmissionOut.of(earlier, replayed=True)

    location = await asyncio.to_thread(store.uploads.save, parsed.images())
    submission: Submission | None = None
    try:
        async with services.submit_lock:
            earlier = await asyncio.to_thread(_check, services, idempotency_key, parsed)
            if earlier is None:
                submit = functools.partial(
                    store.jobs.submit,
                    class_names=parsed.class_names,
                    image_counts=parsed.image_counts,
                    uploads_location=location,
                    idempotency_key=idempotency_key,
                    activate=activate,
                    payload_digest=parsed.digest,
                )
                submission = await asyncio.to_thread(submit)
    except BaseException:
        await asyncio.to_thread(store.uploads.discard, location)
        raise
    if submission is None or not submission.created:
        await asyncio.to_thread(store.uploads.discard, location)
        response.headers[REPLAYED_HEADER] = "true"
        replay = earlier or submission
        assert replay is not None
        return SubmissionOut.of(replay, replayed=True)
    try:
        await asyncio.to_thread(services.dispatcher.submit, submission.job.id)
    except Exception:
        log.exception(
            "announcing job %d failed; it stays queued until a worker's sweep finds it",
            submission.job.id,
        )
    log.info(
        "task %d (classes %s) queued as job %d",
        submission.task.id,
        ", ".join(submission.task.class_names),
        submission.job.id,
    )
    return SubmissionOut.of(submission, replayed=False)
