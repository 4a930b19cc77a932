"""The checks on one uploaded image, before it is decoded (size from its header against
the pixel limit) and while it is (truncated or corrupt files): for POST /classes
(`check_image`) and POST /predict (`decode_image`). Each problem is an `UploadError`."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from server.errors import UploadError
from worker.images import upright_rgb


def _open_checked(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse an image over the pixel limit before any decoding."""
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
    if width * height > max_pixels:
        image.close()
        raise UploadError(
            422,
            f"{name} is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} (DMC_MAX_IMAGE_PIXELS); resize it",
        )
    if width < 1 or height < 1:
        image.close()
        raise UploadError(422, f"{name} has no pixels ({width}x{height})")
    return image


def _decode(image: Image.Image, name: str, draft: int | None) -> None:
    try:
        if draft:
            # JPEG: decode at a reduced scale (still at least `draft` pixels a side).
            image.draft("RGB", (draft, draft))
        image.load()
    except Image.DecompressionBombError as exc:
        raise UploadError(422, f"{name} has too many pixels: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UploadError(
            422, f"{name} is truncated or corrupt ({exc}); send the complete file"
        ) from exc


def check_image(data: bytes, name: str, max_pixels: int) -> None:
    """Refuse data that is not a complete image within the pixel limit (`UploadError`)."""
    image = _open_checked(data, name, max_pixels)
    try:
        _decode(image, name, draft=None)
    finally:
        image.close()


def decode_image(
    data: bytes, name: str, max_pixels: int, *, draft: int | None = None
) -> Image.Image:
    """The image as upright (EXIF) RGB, as the worker decodes uploads (`upright_rgb`: an
    unreadable EXIF tag is ignored); `UploadError` if it is not a complete image within the
    pixel limit."""
    image = _open_checked(data, name, max_pixels)
    try:
        _decode(image, name, draft)
        return upright_rgb(image)
    except (OSError, ValueError) as exc:
        raise UploadError(422, f"{name} cannot be converted to RGB: {exc}") from exc
    finally:
        image.close()
