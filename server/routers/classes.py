"""The classes of the active version, and the tasks that change them: POST /classes (new
classes, or with `mode=extend` more images of known ones), POST /classes/{name}/images
(more images of one class), DELETE /classes/{name} and PATCH /classes/{name} (rename).
Each answers 202 with a queued job that makes a new version."""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Path, Query, Request, Response
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import FormData, UploadFile

from server.dependencies import AdminAccess, ReadAccess, ServicesDep
from server.errors import UploadError, error, responses
from server.gate_fields import GATE_FIELDS, gate_override
from server.schemas import DB_INT_MAX, ClassOut, ClassRename, SubmissionOut, links
from server.uploads import (
    ParsedUpload,
    UploadLimits,
    parse_archive,
    parse_labelled_files,
)
from store.jobs import Submission
from store.models import TaskKind
from store.names import MAX_NAME_LENGTH, class_name_problem, normalize_class_name

log = logging.getLogger(__name__)

router = APIRouter(tags=["classes"])

REPLAYED_HEADER = "Idempotent-Replayed"
_BOOL = TypeAdapter(bool)
UPLOAD_MODES = {"add": TaskKind.ADD, "extend": TaskKind.EXTEND}

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        description="Retry-safe submits: the same key with the same request returns the "
        "first response; with another request, 409.",
    ),
]
BaseVersion = Annotated[
    int | None,
    Query(
        alias="base_version",
        ge=1,
        le=DB_INT_MAX,
        description="The version to build on; by default the one active when the job starts.",
    ),
]
ClassName = Annotated[str, Path(min_length=1, max_length=MAX_NAME_LENGTH)]
_SUBMITTED = responses(400, 401, 403, 404, 409, 422) | links(
    202,
    job=("GET /jobs/{job_id}", {"job_id": "job_id"}),
    cancel=("POST /jobs/{job_id}/cancel", {"job_id": "job_id"}),
    task_jobs=("GET /jobs", {"task_id": "task_id"}),
)


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


def parse_upload(
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
UPLOAD_BODY: dict[str, Any] = {
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
                        **GATE_FIELDS,
                        "mode": {
                            "type": "string",
                            "enum": sorted(UPLOAD_MODES),
                            "default": "add",
                            "description": "`add`: new classes (names not in the version built "
                            "on); `extend`: more images of classes it has (their statistics are "
                            "merged with the new images', then the prompts are trained).",
                        },
                        "base_version": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": DB_INT_MAX,
                            "description": "The version to build on; by default the one active "
                            "when the job starts.",
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
_FIELDS = ("archive", "images", "labels", "activate", "mode", "base_version", *GATE_FIELDS)


def _extend_body() -> dict[str, Any]:
    """POST /classes/{name}/images's body: POST /classes's without `mode`, `labels` optional."""
    body = copy.deepcopy(UPLOAD_BODY)
    schema = body["requestBody"]["content"]["multipart/form-data"]["schema"]
    del schema["properties"]["mode"]
    schema["oneOf"][1]["required"] = ["images"]
    schema["properties"]["labels"]["description"] += " Optional here: all are the class."
    return body


@dataclass
class UploadForm:
    archive: UploadFile | None
    images: list[UploadFile]
    labels: list[str]
    activate: bool
    kind: TaskKind = TaskKind.ADD
    base_version: int | None = None
    # The upload's promotion gate override (`store.evaluations.GateRule` JSON), if any.
    gate: dict[str, float] | None = None


def upload_form(form: FormData, fields: tuple[str, ...] = _FIELDS) -> UploadForm:
    """The upload's fields of a multipart form that may hold only `fields`."""
    unknown = sorted(set(form.keys()) - set(fields))
    if unknown:
        raise UploadError(
            422, f"unknown field(s) {', '.join(map(repr, unknown))}; the fields are {fields}"
        )
    archives, images = form.getlist("archive"), form.getlist("images")
    labels, activate = form.getlist("labels"), form.getlist("activate")
    mode, base = form.getlist("mode"), form.getlist("base_version")
    if len(archives) > 1 or not all(isinstance(v, UploadFile) for v in archives + images):
        raise UploadError(422, "`archive` must be one file and `images` files")
    if not all(isinstance(v, str) for v in labels + activate + mode + base) or any(
        len(v) > 1 for v in (activate, mode, base)
    ):
        raise UploadError(
            422, "`labels` must be text fields; `activate`, `mode` and `base_version` one each"
        )
    try:
        active = _BOOL.validate_python(activate[0]) if activate else True
    except ValidationError:
        raise UploadError(422, "`activate` must be true or false") from None
    if mode and mode[0] not in UPLOAD_MODES:
        raise UploadError(422, f"`mode` is one of {', '.join(sorted(UPLOAD_MODES))}")
    try:
        base_version = int(str(base[0])) if base else None
    except ValueError:
        raise UploadError(422, "`base_version` must be a version id (a whole number)") from None
    if base_version is not None and not 1 <= base_version <= DB_INT_MAX:
        raise UploadError(422, f"`base_version` must be between 1 and {DB_INT_MAX}")
    return UploadForm(
        archive=archives[0] if archives else None,  # type: ignore[arg-type]
        images=images,  # type: ignore[arg-type]
        labels=labels,  # type: ignore[arg-type]
        activate=active,
        kind=UPLOAD_MODES[str(mode[0])] if mode else TaskKind.ADD,
        base_version=base_version,
        gate=gate_override(form),
    )


async def read_upload(request: Request, services: ServicesDep) -> AsyncIterator[UploadForm]:
    """The multipart fields of POST /classes; the files stay open until the response."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "multipart/form-data":
        raise error(415, "send multipart/form-data with an `archive` file or `images` files")
    most = services.settings.max_upload_images
    async with request.form(max_files=most + 1, max_fields=most + 16) as form:
        yield upload_form(form)


@router.post(
    "/classes",
    status_code=202,
    response_model=SubmissionOut,
    responses=_SUBMITTED | responses(413, 415),
    openapi_extra=UPLOAD_BODY,
)
async def add_classes(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    upload: Annotated[UploadForm, Depends(read_upload)],
    idempotency_key: IdempotencyKey = None,
) -> SubmissionOut:
    """Add new classes (a task), or with `mode=extend` give classes the version has more
    images. The images are validated (each bad file is a 4xx and nothing is stored),
    stored, and a job is queued that learns them into a new version. Answers 202 with the
    task and job; follow the job at GET /jobs/{job_id}. 409: a new class's name is taken
    in the version built on (or by a queued task); 404: a class to extend, or the
    `base_version`, does not exist."""
    limits = UploadLimits.from_settings(services.settings)
    parsed = await asyncio.to_thread(
        parse_upload, upload.archive, upload.images, upload.labels, limits
    )
    return await _submit_upload(services, response, parsed, upload, idempotency_key)


@router.post(
    "/classes/{name}/images",
    status_code=202,
    response_model=SubmissionOut,
    responses=_SUBMITTED | responses(413, 415),
    openapi_extra=_extend_body(),
)
async def extend_class(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    name: ClassName,
    upload: Annotated[UploadForm, Depends(read_upload)],
    idempotency_key: IdempotencyKey = None,
) -> SubmissionOut:
    """Give one class more images (the same upload formats as POST /classes; `labels` may
    be left out, and any given must be this class). Its Gaussian statistics are merged
    exactly with those of the new images, then the prompts are trained, in a new version.
    404: the version built on has no such class."""
    name = normalize_class_name(name)
    labels = upload.labels or ([name] * len(upload.images) if upload.images else [])
    limits = UploadLimits.from_settings(services.settings)
    parsed = await asyncio.to_thread(parse_upload, upload.archive, upload.images, labels, limits)
    if parsed.class_names != (name,):
        listed = ", ".join(map(repr, parsed.class_names))
        raise UploadError(
            422,
            f"this route extends class {name!r}, but the upload holds {listed}; use "
            "POST /classes with mode=extend for several classes",
        )
    upload.kind = TaskKind.EXTEND
    return await _submit_upload(services, response, parsed, upload, idempotency_key)


@router.delete(
    "/classes/{name}", status_code=202, response_model=SubmissionOut, responses=_SUBMITTED
)
async def remove_class(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    name: ClassName,
    base_version: BaseVersion = None,
    idempotency_key: IdempotencyKey = None,
) -> SubmissionOut:
    """Remove a class: a job makes a version without it (its prompt entry and statistics
    dropped); predictions never return it, and a class of that name may be added later.
    404: the version built on has no such class."""
    submit = functools.partial(
        services.store.jobs.submit,
        class_names=[normalize_class_name(name)],
        image_counts=[],
        kind=TaskKind.REMOVE,
        base_version_id=base_version,
        idempotency_key=idempotency_key,
        refuse_taken_classes=True,
    )
    return await _queue(services, response, submit)


@router.patch(
    "/classes/{name}", status_code=202, response_model=SubmissionOut, responses=_SUBMITTED
)
async def rename_class(
    services: ServicesDep,
    _: AdminAccess,
    response: Response,
    name: ClassName,
    rename: Annotated[ClassRename, Body()],
    base_version: BaseVersion = None,
    idempotency_key: IdempotencyKey = None,
) -> SubmissionOut:
    """Rename a class: a job makes a version whose prompts use the new name; its
    statistics are kept. 404: no such class; 409: the new name is taken."""
    new = normalize_class_name(rename.name)
    problem = class_name_problem(new, services.settings.max_class_name_length)
    if problem is not None:
        raise UploadError(422, problem)
    submit = functools.partial(
        services.store.jobs.submit,
        class_names=[normalize_class_name(name)],
        image_counts=[],
        kind=TaskKind.RENAME,
        arguments={"name": new},
        base_version_id=base_version,
        idempotency_key=idempotency_key,
        refuse_taken_classes=True,
    )
    return await _queue(services, response, submit)


async def _submit_upload(
    services: ServicesDep,
    response: Response,
    parsed: ParsedUpload,
    upload: UploadForm,
    idempotency_key: str | None,
) -> SubmissionOut:
    store = services.store
    # A replay, or a class that does not fit, is answered before the images are stored;
    # `submit` checks both again, with the insert, in one transaction.
    precheck = functools.partial(
        store.jobs.precheck,
        idempotency_key,
        parsed.class_names,
        parsed.image_counts,
        parsed.digest,
        kind=upload.kind,
        base_version_id=upload.base_version,
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
        gate=upload.gate,
        payload_digest=parsed.digest,
        refuse_taken_classes=True,
        kind=upload.kind,
        base_version_id=upload.base_version,
    )
    try:
        submission = await asyncio.to_thread(submit)
    except BaseException:
        await asyncio.to_thread(store.uploads.discard, location)
        raise
    if not submission.created:
        await asyncio.to_thread(store.uploads.discard, location)
    return await _announce(services, response, submission)


async def _queue(
    services: ServicesDep, response: Response, submit: Callable[[], Submission]
) -> SubmissionOut:
    """Record a task without uploads (a removal, a rename) and announce its job."""
    try:
        submission = await asyncio.to_thread(submit)
    except ValueError as problem:
        raise UploadError(422, str(problem)) from None
    return await _announce(services, response, submission)


async def _announce(
    services: ServicesDep, response: Response, submission: Submission
) -> SubmissionOut:
    if not submission.created:
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
        "task %d (%s %s) queued as job %d",
        submission.task.id,
        submission.task.kind.value,
        ", ".join(submission.task.class_names),
        submission.job.id,
    )
    return SubmissionOut.of(submission, replayed=False)
