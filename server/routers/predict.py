"""POST /predict: the top classes of one or more images (multipart files, or JSON with
base64), answered through the micro-batcher."""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Query, Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from server.batcher import BatcherStoppedError, QueueFullError
from server.dependencies import PredictAccess, ServicesDep
from server.errors import error, responses, validation_detail
from server.images import ImageLimits, prepare_batch
from server.model import LoadedModel, LoadsBusyError, NoActiveVersionError, VersionLoadError
from server.schemas import DB_INT_MAX, ClassScore, ImagePrediction, PredictJSON, PredictOut
from server.settings import ServerSettings

router = APIRouter(tags=["predict"])

DEFAULT_TOP_K = 5

_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Multipart files in `images` (repeat the field for more), or JSON "
        "with the images as base64.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "format": "binary"},
                        },
                        "top_k": {"type": "integer", "minimum": 1},
                        "version": {"type": "integer", "minimum": 1, "maximum": DB_INT_MAX},
                    },
                }
            },
            "application/json": {"schema": PredictJSON.model_json_schema()},
        },
    }
}


def _int_field(value: Any, name: str, maximum: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise error(422, f"field {name!r} must be an integer, not a file")
    try:
        number = int(value)
    except ValueError:
        raise error(422, f"field {name!r} must be an integer, not {value[:40]!r}") from None
    if number < 1:
        raise error(422, f"field {name!r} must be at least 1")
    if maximum is not None and number > maximum:
        raise error(422, f"field {name!r} must be at most {maximum}")
    return number


async def _read_multipart(
    request: Request, max_images: int
) -> tuple[list[tuple[str | None, bytes]], int | None, int | None]:
    async with request.form(max_files=max_images + 1, max_fields=16) as form:
        values = form.getlist("images")
        if not values and any(isinstance(v, UploadFile) for _, v in form.multi_items()):
            raise error(422, "put the image files in the 'images' field")
        if any(not isinstance(v, UploadFile) for v in values):
            raise error(422, "field 'images' must hold files (multipart file parts)")
        if len(values) > max_images:
            raise error(
                422,
                f"{len(values)} images in one request; at most {max_images} "
                "(DMC_MAX_PREDICT_IMAGES): split them over several requests",
            )
        files = [(v.filename, await v.read()) for v in values if isinstance(v, UploadFile)]
        top_k = _int_field(form.get("top_k"), "top_k")
        return files, top_k, _int_field(form.get("version"), "version", DB_INT_MAX)


def _b64(text: str, index: int) -> bytes:
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # a data URL
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise error(422, f"images[{index}] is not valid base64") from None


async def _read_json(
    request: Request, max_images: int
) -> tuple[list[tuple[str | None, bytes]], int | None, int | None]:
    try:
        payload = PredictJSON.model_validate_json(await request.body())
    except ValidationError as exc:
        raise error(422, validation_detail(exc.errors())) from None
    if len(payload.images) > max_images:
        raise error(
            422,
            f"{len(payload.images)} images in one request; at most {max_images} "
            "(DMC_MAX_PREDICT_IMAGES): split them over several requests",
        )
    files: list[tuple[str | None, bytes]] = [
        (None, _b64(text, i)) for i, text in enumerate(payload.images)
    ]
    return files, payload.top_k, payload.version


def _prepare(
    model: LoadedModel, files: list[tuple[str | None, bytes]], settings: ServerSettings
) -> torch.Tensor:
    named = [
        (f"image {name!r}" if name else f"images[{i}]", data)
        for i, (name, data) in enumerate(files)
    ]
    return prepare_batch(
        named,
        ImageLimits(settings.max_image_pixels, settings.max_image_aspect_ratio),
        max_side=settings.max_image_side,
        max_total_pixels=settings.max_predict_pixels,
        to_tensor=model.preprocess,
    )


@router.post(
    "/predict",
    response_model=PredictOut,
    responses=responses(400, 401, 403, 404, 409, 413, 415, 422),
    openapi_extra=_BODY,
)
async def predict(
    request: Request,
    services: ServicesDep,
    _: PredictAccess,
    top_k: Annotated[
        int | None, Query(ge=1, description=f"Classes per image (default {DEFAULT_TOP_K}).")
    ] = None,
    version: Annotated[
        int | None,
        Query(
            ge=1, le=DB_INT_MAX, description="Answer with this version instead of the active one."
        ),
    ] = None,
) -> PredictOut:
    """The top-k classes of each image with their probabilities, and the version that
    answered. Requests are batched with concurrent ones into one forward pass."""
    settings = services.settings
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime == "multipart/form-data":
        files, body_k, body_version = await _read_multipart(request, settings.max_predict_images)
    elif mime == "application/json" or mime.endswith("+json"):
        files, body_k, body_version = await _read_json(request, settings.max_predict_images)
    else:
        raise error(
            415,
            "send multipart/form-data with the images in 'images' file fields, or "
            'application/json like {"images": ["<base64>"], "top_k": 5}',
        )
    if not files:
        raise error(422, "no image in the request: send at least one in 'images'")
    k = body_k or top_k or DEFAULT_TOP_K
    if k > settings.max_top_k:
        raise error(422, f"top_k is {k}; at most {settings.max_top_k}")
    wanted = body_version or version

    try:
        model = await services.holder.get(wanted)
    except NoActiveVersionError as exc:
        raise error(503, str(exc), {"Retry-After": str(settings.retry_after_seconds)}) from None
    except VersionLoadError as exc:
        raise error(409, str(exc)) from None
    except LoadsBusyError as exc:
        raise error(503, str(exc), {"Retry-After": str(settings.retry_after_seconds)}) from None

    with services.batcher.incoming(len(files)):
        # Its own threads: handlers waiting on the database never hold up a predict.
        pixels = await asyncio.get_running_loop().run_in_executor(
            services.predict_pool, _prepare, model, files, settings
        )
    # No await between the announcement's end and the enqueue in `submit`.
    try:
        ranked = await services.batcher.submit(model, pixels, k)
    except QueueFullError as exc:
        raise error(
            503,
            f"the server is busy ({exc}); retry after {settings.retry_after_seconds}s",
            {"Retry-After": str(settings.retry_after_seconds)},
        ) from None
    except BatcherStoppedError as exc:
        raise error(503, str(exc), {"Retry-After": str(settings.retry_after_seconds)}) from None
    return PredictOut(
        version_id=model.version_id,
        predictions=[
            ImagePrediction(
                filename=name,
                classes=[
                    ClassScore(name=n, probability=p)
                    for n, p in zip(r.names, r.probabilities, strict=True)
                ],
            )
            for (name, _), r in zip(files, ranked, strict=True)
        ],
    )
