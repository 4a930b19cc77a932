"""POST /evaluation-sets (a labelled image set versions are evaluated on), GET
/evaluation-sets, GET /evaluation-sets/{set_id}."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from server.dependencies import AdminAccess, ReadAccess, ServicesDep
from server.errors import UploadError, error, responses
from server.routers.classes import UPLOAD_BODY, parse_upload, upload_form
from server.schemas import DB_INT_MAX, EvaluationSetOut
from server.uploads import UploadLimits
from store.names import normalize_class_name

router = APIRouter(prefix="/evaluation-sets", tags=["evaluation sets"])

SetId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="The evaluation set's id.")]
_FIELDS = ("name", "archive", "images", "labels")


def _body() -> dict[str, Any]:
    """POST /classes's multipart body, with `name` instead of `activate` and the gate."""
    body = copy.deepcopy(UPLOAD_BODY)
    schema = body["requestBody"]["content"]["multipart/form-data"]["schema"]
    schema["properties"] = {
        "name": {
            "type": "string",
            "minLength": 1,
            "maxLength": 200,
            "pattern": r"\S",
            "description": "The set's name; uploading under a taken name adds a revision.",
        }
    } | {k: v for k, v in schema["properties"].items() if k in _FIELDS}
    schema["required"] = ["name"]
    body["requestBody"]["description"] = (
        "A name, and one archive or image files with one label each (not both)."
    )
    return body


@router.post(
    "",
    status_code=201,
    response_model=EvaluationSetOut,
    responses=responses(400, 401, 403, 413, 415, 422),
    openapi_extra=_body(),
)
async def add_evaluation_set(
    request: Request, services: ServicesDep, _: AdminAccess
) -> EvaluationSetOut:
    """Upload a labelled image set (the formats of POST /classes) that every new version
    is evaluated on, with its parent on the same images, before the promotion gate
    decides. Its classes need not be learned yet: their images count once a version
    learns them. A name already used gets its next revision; the newest one is used."""
    settings = services.settings
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "multipart/form-data":
        raise error(415, "send multipart/form-data with a `name` and an `archive` or `images`")
    # An evaluation set may hold a single image of a class.
    limits = dataclasses.replace(UploadLimits.from_settings(settings), min_images_per_class=1)
    most = settings.max_upload_images
    async with request.form(max_files=most + 1, max_fields=most + 16) as form:
        names = form.getlist("name")
        if len(names) != 1 or not isinstance(names[0], str):
            raise UploadError(422, "send the set's `name` as one text field")
        name = normalize_class_name(names[0])
        if not name or len(name) > settings.max_class_name_length:
            raise UploadError(
                422, f"the set's `name` must be 1 to {settings.max_class_name_length} characters"
            )
        upload = upload_form(form, _FIELDS)
        parsed = await asyncio.to_thread(
            parse_upload, upload.archive, upload.images, upload.labels, limits
        )

        def store_set() -> EvaluationSetOut:
            try:
                info = services.store.evaluation_sets.add(
                    name,
                    parsed.images(),
                    class_names=parsed.class_names,
                    image_counts=parsed.image_counts,
                )
            except ValueError as problem:
                raise UploadError(422, str(problem)) from problem
            return EvaluationSetOut.of(info)

        return await asyncio.to_thread(store_set)


@router.get("", response_model=list[EvaluationSetOut], responses=responses(401, 403))
async def list_evaluation_sets(services: ServicesDep, _: ReadAccess) -> list[EvaluationSetOut]:
    """Every evaluation set, by name, newest revision first."""
    sets = await asyncio.to_thread(services.store.evaluation_sets.list)
    return [EvaluationSetOut.of(s) for s in sets]


@router.get("/{set_id}", response_model=EvaluationSetOut, responses=responses(401, 403, 404, 422))
async def get_evaluation_set(
    services: ServicesDep, _: ReadAccess, set_id: SetId
) -> EvaluationSetOut:
    """One evaluation set: its classes and image counts."""
    return EvaluationSetOut.of(await asyncio.to_thread(services.store.evaluation_sets.get, set_id))
