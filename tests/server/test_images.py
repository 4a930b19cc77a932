"""server.images without HTTP: the checks on one image and its decoding for predict."""

from __future__ import annotations

import io

from PIL import Image

from server.images import ImageLimits, check_image, decode_image
from tests.server.test_predict import huge_png, jpeg
from tests.server.test_uploads import refused


def png_with_exif(exif: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(buffer, format="PNG", exif=exif)
    return buffer.getvalue()


def test_decode_image() -> None:
    image = decode_image(jpeg(), "a", ImageLimits(1_000_000))
    assert image.mode == "RGB" and image.size == (48, 40)
    with refused(422, "over the limit"):
        decode_image(huge_png(2000, 1000), "a", ImageLimits(1_000_000))
    # Over PIL's own limit too: refused before anything is decoded.
    with refused(422, "pixels"):
        decode_image(huge_png(20_000, 20_000), "a", ImageLimits(1_000_000))


def test_an_unreadable_exif_block_is_ignored_as_the_worker_does() -> None:
    data = png_with_exif(b"not a TIFF header")
    check_image(data, "a", ImageLimits(1_000_000))
    image = decode_image(data, "a", ImageLimits(1_000_000))
    assert image.mode == "RGB" and image.size == (30, 20)
    assert image.getpixel((0, 0)) == (255, 0, 0)
