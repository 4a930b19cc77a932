"""Decode a task's uploaded images into the PIL images the learner takes."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageOps

from store.uploads import UploadedImage
from worker.errors import JobFailedError

_LISTED = 5


def upright_rgb(image: Image.Image) -> Image.Image:
    """A loaded image as RGB, turned upright by its EXIF orientation. An unreadable EXIF
    block or orientation tag is ignored: the pixels are still fine (the server's predict
    decodes its images with this too, so both read an image the same way)."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:
        upright = image
    return upright.convert("RGB")


def decode_image(data: bytes, *, max_side: int = 0) -> Image.Image:
    """An RGB image, turned upright (EXIF) and shrunk to at most `max_side` pixels a side
    (0: as uploaded). Raises whatever PIL raises for data that is not an image."""
    with Image.open(io.BytesIO(data)) as opened:
        if max_side:
            # JPEG: decode at a reduced scale right away (at least `max_side`).
            opened.draft("RGB", (max_side, max_side))
        opened.load()
        image = upright_rgb(opened)
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def decode_task_images(
    uploads: Sequence[UploadedImage], class_names: Sequence[str], *, max_side: int = 0
) -> tuple[list[Image.Image], list[int]]:
    """The images and their labels (positions in `class_names`).

    Raises `JobFailedError` naming the files that cannot be decoded, or an image whose class is
    not one of the task's.
    """
    index = {name: i for i, name in enumerate(class_names)}
    images: list[Image.Image] = []
    labels: list[int] = []
    bad: list[str] = []
    for upload in uploads:
        if upload.class_name not in index:
            raise JobFailedError(
                f"the uploaded image {upload.filename!r} is labelled {upload.class_name!r}, "
                f"which is not one of the task's classes ({', '.join(class_names)}); "
                "upload the task again"
            )
        try:
            image = decode_image(upload.data, max_side=max_side)
        except Exception as error:
            reason = str(error) or type(error).__name__
            bad.append(f"{upload.filename!r} (class {upload.class_name!r}): {reason}")
            continue
        images.append(image)
        labels.append(index[upload.class_name])
    if bad:
        listed = "; ".join(bad[:_LISTED])
        more = f"; and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
        raise JobFailedError(
            f"{len(bad)} of the {len(uploads)} uploaded images cannot be decoded as images: "
            f"{listed}{more}. Upload the task again with these files replaced by JPEG, PNG "
            "or WebP images, or left out."
        )
    return images, labels
