"""Decoding a task's uploaded images."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from store.uploads import UploadedImage
from tests.worker.helpers import png
from worker.errors import JobFailedError
from worker.images import decode_image, decode_task_images, upright_rgb


def test_decoding_shrinks_large_images_and_keeps_labels() -> None:
    big = Image.new("L", (300, 150), color=128)
    uploads = [UploadedImage("b", "b.png", png(big)), UploadedImage("a", "a.png", png(big))]
    images, labels = decode_task_images(uploads, ["a", "b"], max_side=64)
    assert labels == [1, 0]
    assert [im.size for im in images] == [(64, 32), (64, 32)]
    assert all(im.mode == "RGB" for im in images)
    kept, _ = decode_task_images(uploads[:1], ["b"], max_side=0)
    assert kept[0].size == (300, 150)


def test_decoding_names_every_bad_file_and_what_to_do() -> None:
    good = png(Image.new("RGB", (8, 8)))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[:40]
    uploads = [
        UploadedImage("cat", "ok.png", good),
        UploadedImage("cat", "notes.txt", b"hello"),
        UploadedImage("dog", "cut.jpg", truncated),
    ]
    with pytest.raises(JobFailedError) as caught:
        decode_task_images(uploads, ["cat", "dog"])
    message = str(caught.value)
    assert message.startswith("2 of the 3 uploaded images cannot be decoded")
    assert "'notes.txt' (class 'cat')" in message and "'cut.jpg' (class 'dog')" in message
    assert "JPEG, PNG or WebP" in message
    with pytest.raises(JobFailedError, match="labelled 'owl', which is not one of"):
        decode_task_images([UploadedImage("owl", "o.png", good)], ["cat"])


def test_images_are_turned_upright_and_a_bad_exif_block_is_ignored() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), "blue").save(buffer, format="PNG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (20, 30)
    buffer = io.BytesIO()
    Image.new("L", (30, 20), 200).save(buffer, format="PNG", exif=b"not a TIFF header")
    with Image.open(io.BytesIO(buffer.getvalue())) as opened:
        opened.load()
        image = upright_rgb(opened)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert decode_image(buffer.getvalue()).getpixel((0, 0)) == (200, 200, 200)
