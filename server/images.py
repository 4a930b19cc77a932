"""The checks on one uploaded image, before it is decoded (size and aspect ratio from its
header) and while it is (truncated or corrupt files): for POST /classes (`check_image`)
and POST /predict (`open_image`, `decode_image`). Each problem is an `UploadError`.

Predict decodes with bounded memory: a JPEG at a reduced scale (draft mode), any image
shrunk to `max_side` (box reduction, then Lanczos) in its own mode before it becomes RGB."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, UnidentifiedImageError

from server.errors import UploadError
from worker.images import upright_rgb

# Modes shrunk before they become RGB; any other (palette and bilevel images resize only
# with nearest-neighbour, 16-bit ones not at all) is made RGB first, as the worker does.
_SHRINK_AS_IS = frozenset({"L", "LA", "RGB", "RGBA", "RGBX"})


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: `max_pixels` (width x height) and `max_aspect_ratio` (long
    side / short side; 0: any)."""

    max_pixels: int
    max_aspect_ratio: float = 0.0


def open_image(data: bytes, name: str, limits: ImageLimits) -> Image.Image:
    """Open an image (header only, nothing decoded) and refuse it if it is empty, not an
    image, or over the pixel or aspect-ratio limit (`UploadError`, 422)."""
    max_pixels = limits.max_pixels
    if not data:
        raise UploadError(422, f"{name} is empty (0 bytes); send an image file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise UploadError(
            422,
            f"{name} has too many pixels ({exc}); the limit is {max_pixels} pixels "
            "(DMC_MAX_IMAGE_PIXELS): send a smaller image",
        ) from exc
    except UnidentifiedImageError as exc:
        raise UploadError(
            422, f"{name} is not an image (or not a format the server reads, e.g. JPEG, PNG, WebP)"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise UploadError(
            422, f"{name} is truncated or corrupt ({exc}); send the complete image file"
        ) from exc
    width, height = image.size
    problem = _size_problem(width, height, limits)
    if problem is not None:
        image.close()
        raise UploadError(422, f"{name} {problem}")
    return image


def _size_problem(width: int, height: int, limits: ImageLimits) -> str | None:
    if width < 1 or height < 1:
        return f"has no pixels ({width}x{height})"
    if width * height > limits.max_pixels:
        return (
            f"is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} (DMC_MAX_IMAGE_PIXELS); resize it"
        )
    ratio = max(width, height) / min(width, height)
    if limits.max_aspect_ratio and ratio > limits.max_aspect_ratio:
        return (
            f"is {width}x{height}, an aspect ratio of {ratio:.0f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1 (DMC_MAX_IMAGE_ASPECT_RATIO); crop it"
        )
    return None


def _load(image: Image.Image, name: str, max_side: int) -> None:
    try:
        if max_side:
            # JPEG: decode at a reduced scale (still at least `max_side` pixels a side).
            image.draft("RGB", (max_side, max_side))
        image.load()
    except Image.DecompressionBombError as exc:
        raise UploadError(422, f"{name} has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(
            422, f"{name} is truncated or corrupt ({exc}); send the complete file"
        ) from exc


def check_image(data: bytes, name: str, limits: ImageLimits) -> None:
    """Refuse data that is not a complete image within the limits (`UploadError`)."""
    image = open_image(data, name, limits)
    try:
        _load(image, name, max_side=0)
    finally:
        image.close()


def decode_opened(image: Image.Image, name: str, *, max_side: int = 0) -> Image.Image:
    """An image from `open_image` as upright (EXIF) RGB at most `max_side` pixels a side
    (0: as sent), as the worker decodes uploads (`upright_rgb`: an unreadable EXIF tag is
    ignored). Closes `image`; `UploadError` if it is not a complete image."""
    try:
        _load(image, name, max_side)
        if max_side and max(image.size) > max_side:
            if image.mode not in _SHRINK_AS_IS:
                rgb = upright_rgb(image)
                rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
                return rgb
            image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return upright_rgb(image)
    except (OSError, ValueError) as exc:
        raise UploadError(422, f"{name} cannot be converted to RGB: {exc}") from exc
    finally:
        image.close()


def decode_image(data: bytes, name: str, limits: ImageLimits, *, max_side: int = 0) -> Image.Image:
    """`decode_opened(open_image(...))`: one image's bytes as upright RGB."""
    return decode_opened(open_image(data, name, limits), name, max_side=max_side)


def prepare_batch(
    files: Sequence[tuple[str, bytes]],
    limits: ImageLimits,
    *,
    max_side: int,
    max_total_pixels: int,
    to_tensor: Callable[[Sequence[Image.Image]], torch.Tensor],
) -> torch.Tensor:
    """The model input for (name, bytes) images: every header is checked first (each
    image's limits, then their pixels together against `max_total_pixels`), then the
    images are decoded one at a time, each released once it is a tensor, so a request
    holds at most one decoded image."""
    opened: list[Image.Image] = []
    try:
        for name, data in files:
            opened.append(open_image(data, name, limits))
        total = sum(image.width * image.height for image in opened)
        if total > max_total_pixels:
            raise UploadError(
                422,
                f"the {len(files)} images add up to {total} pixels, over the limit of "
                f"{max_total_pixels} for one request (DMC_MAX_PREDICT_PIXELS): send smaller "
                "images or fewer per request",
            )
        rows: list[torch.Tensor] = []
        for (name, _), image in zip(files, opened, strict=True):
            rgb = decode_opened(image, name, max_side=max_side)
            try:
                rows.append(to_tensor([rgb])[0])
            finally:
                rgb.close()
        return torch.stack(rows)
    finally:
        for image in opened:
            image.close()
