"""GET /classes, POST /classes (a task: new classes with their images)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData, UploadFile

from server.dependencies import AdminAccess, ReadAccess, ServicesDep
from server.errors import UploadError, error, responses
from server.schemas import ClassOut, SubmissionOut, links
from server.uploads import (
    ParsedUpload,
    UploadLimits,
    parse_archive,
    parse_labelled_files,
)
from store.names import MAX_NAME_LENGTH

log = logging.getLogger(__name__)

router = APIRouter(tags=["classes"])

REPLAYED_HEADER = "Idempotent-Replayed"
_BOOL = TypeAdapter(bool)


@router.get("/classes", response_model=list[ClassOut], responses=responses(401, 403))
async def list_classes(services: ServicesDep, _: ReadAccess) -> list[ClassOut]:
    """The active version's classes, in label order, each with the task and version it
    arrived in (classes removed, or only on abandoned branches, are not listed)."""
    registry = services.store.registry

    def read() -> list[ClassOut]:
        active = registry.active()
        rows = registry.classes(active.id) if active else []
        return [
            ClassOut(name=r.name, version_id=r.version_id, task_id=r.task_id, active=True)
            for r in rows
        ]

    return await asyncio.to_thread(read)


def _parse(
    archive: UploadFile | None, images: list[UploadFile], labels: list[str], limits: UploadLimits
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
        return parse_labelled_files([(f.filename, f.file) for f in images], labels, limits)
    raise UploadError(
        422,
        "send an `archive` file (zip or tar with one folder per class) or `images` files "
        "with one `labels` field each",
    )


_BINARY = {"type": "string", "format": "binary"}
_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One archive, or image files with one label each (not both).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "archive": _BINARY
                        | {
                            "description": "A zip or tar archive (optionally .gz/.bz2/.xz) "
                            "with one folder per class: `<class name>/<image>`, optionally "
                            "all inside one top folder."
                        },
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": _BINARY,
                            "description": "Image files (repeat the field).",
                        },
                        "labels": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string"},
                            "description": "The class name of each image, in the same "
                            "order (repeat the field).",
                        },
                        "activate": {
                            "type": "boolean",
                            "default": True,
                            "description": "Make the learned version active when the job succeeds.",
                        },
                    },
                    "oneOf": [
                        {
                            "title": "Archive",
                            "required": ["archive"],
                            "properties": {"images": False, "labels": False},
                        },
                        {
                            "title": "Labelled images",
                            "required": ["images", "labels"],
                            "properties": {"archive": False},
                        },
                    ],
                }
            }
        },
    }
}
_FIELDS = ("archive", "images", "labels", "activate")


@dataclass
class UploadForm:
    archive: UploadFile | None
    images: list[UploadFile]
    labels: list[str]
    activate: bool


def _form_fields(form: FormData) -> UploadForm:
    unknown = sorted(set(form.keys()) - set(_FIELDS))
    if unknown:
        raise UploadError(
            422, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {_FIELDS}"
        )
    archives, images = form.getlist("archive"), form.getlist("images")
    labels, activate = form.getlist("labels"), form.getlist("activate")
    if len(archives) > 1 or not all(isinstance(v, UploadFile) for v in archives + images):
        raise UploadError(422, "`archive` must be one file and `images` files")
    if not all(isinstance(v, str) for v in labels + activate) or len(activate) > 1:
        raise UploadError(422, "`labels` must be text fields and `activate` one text field")
    try:
        active = _BOOL.validate_python(activate[0]) if activate else True
    except ValidationError:
        raise UploadError(422, "`activate` must be true or false") from None
    return UploadForm(
        archive=archives[0] if archives else None,  # type: ignore[arg-type]
        images=images,  # type: ignore[arg-type]
        labels=labels,  # type: ignore[arg-type]
        activate=active,
    )


async def read_upload(request: Request, services: ServicesDep) -> AsyncIterator[UploadForm]:
    """The multipart fields of POST /classes; the files stay open until the response."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "multipart/form-data":
        raise error(415, "send multipart/form-data with an `archive` file or `images` files")
    most = services.settings.max_upload_images
    async with request.form(max_files=most + 1, max_fields=most + 16) as form:
        yield _form_fields(form)


@router.post(
    "/classes",
    status_code=202,
    response_model=SubmissionOut,
    responses=responses(400, 401, 403, 409, 413, 415, 422)
    | links(
        202,
        job=("GET /jobs/{job_id}", {"job_id": "job_id"}),
        cancel=("POST /jobs/{job_id}/cancel", {"job_id": "job_id"}),
        task_jobs=("GET /jobs", {"task_id": "task_id"}),
    ),
    openapi_extra=_UPLOAD_BODY,
)
async def add_classes(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    upload: Annotated[UploadForm, Depends(read_upload)],
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
    parsed = await asyncio.to_thread(_parse, upload.archive, upload.images, upload.labels, limits)

    # A replay, or a class already taken, is answered before the images are stored;
    # `submit` checks both again, with the insert, in one transaction.
    precheck = functools.partial(
        store.jobs.precheck,
        idempotency_key,
        parsed.class_names,
        parsed.image_counts,
        parsed.digest,
    )
    earlier = await asyncio.to_thread(precheck)
    if earlier is not None:
        response.headers[REPLAYED_HEADER] = "true"
        return SubmissionOut.of(earlier, replayed=True)

    location = await asyncio.to_thread(store.uploads.save, parsed.images())
    submit = functools.partial(
        store.jobs.submit,
        class_names=parsed.class_names,
        image_counts=parsed.image_counts,
        uploads_location=location,
        idempotency_key=idempotency_key,
        activate=upload.activate,
        payload_digest=parsed.digest,
        refuse_taken_classes=True,
    )
    try:
        submission = await asyncio.to_thread(submit)
    except BaseException:
        await asyncio.to_thread(store.uploads.discard, location)
        raise
    if not submission.created:
        await asyncio.to_thread(store.uploads.discard, location)
        response.headers[REPLAYED_HEADER] = "true"
        return SubmissionOut.of(submission, replayed=True)
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
