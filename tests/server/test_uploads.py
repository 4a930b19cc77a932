"""server.uploads without HTTP: archive layouts, labelled files and class names."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from PIL import Image

from server.errors import UploadError
from server.uploads import (
    UploadLimits,
    clean_class_name,
    parse_archive,
    parse_labelled_files,
)
from store.uploads import ImageStream
from tests.server.conftest import colour_pngs
from tests.server.test_classes import tar_bytes, zip_bytes

LIMITS = UploadLimits(
    max_image_pixels=1_000_000,
    max_extracted_bytes=10_000_000,
    max_images=100,
    max_class_name_length=20,
    min_images_per_class=2,
    max_archive_entries=1_000,
    max_image_bytes=1_000_000,
)
IMAGES = [data for _, data in colour_pngs([0], 4)]


def streamed(image: ImageStream) -> bytes:
    with image.open() as stream:
        return stream.read()


@contextmanager
def refused(status: int, words: str) -> Iterator[None]:
    with pytest.raises(UploadError, match=words) as caught:
        yield
    assert caught.value.status_code == status


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_compressions(mode: str) -> None:
    files = {"a/1.png": IMAGES[0], "a/2.png": IMAGES[1], "b/1.png": IMAGES[2], "b/2.png": IMAGES[3]}
    parsed = parse_archive(io.BytesIO(tar_bytes(files, mode)), LIMITS)
    assert (parsed.class_names, parsed.image_counts) == (("a", "b"), (2, 2))
    stored = list(parsed.images())
    assert [(u.class_name, u.filename) for u in stored] == [
        ("a", "a/1.png"),
        ("a", "a/2.png"),
        ("b", "b/1.png"),
        ("b", "b/2.png"),
    ]
    assert streamed(stored[3]) == IMAGES[3]


def test_one_top_folder_is_stripped_and_names_are_normalised() -> None:
    decomposed = "cafe\u0301"  # "café" as macOS archivers write it (NFD)
    files = {f"top/{decomposed}/{i}.png": IMAGES[i] for i in range(2)}
    files.update({f"top/ b /{i}.png": IMAGES[i] for i in range(2)})
    parsed = parse_archive(io.BytesIO(zip_bytes(files)), LIMITS)
    assert parsed.class_names == ("b", "caf\u00e9")


def test_the_digest_follows_the_images_not_the_file_names() -> None:
    one = parse_archive(io.BytesIO(zip_bytes({"a/1.png": IMAGES[0], "a/2.png": IMAGES[1]})), LIMITS)
    renamed = parse_archive(
        io.BytesIO(zip_bytes({"a/x.png": IMAGES[1], "a/y.png": IMAGES[0]})), LIMITS
    )
    other = parse_archive(
        io.BytesIO(zip_bytes({"a/1.png": IMAGES[0], "a/2.png": IMAGES[2]})), LIMITS
    )
    assert one.digest == renamed.digest != other.digest


def test_layout_errors() -> None:
    with refused(422, "not inside a class folder"):
        parse_archive(
            io.BytesIO(zip_bytes({"a/b/c/1.png": IMAGES[0], "x/1.png": IMAGES[1]})), LIMITS
        )
    with refused(422, "holds no images"):
        parse_archive(io.BytesIO(zip_bytes({".hidden/1.png": IMAGES[0]})), LIMITS)
    with refused(422, "empty"):
        parse_archive(io.BytesIO(b""), LIMITS)


def test_zip_symlinks_and_encryption_are_refused() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("a/link.png")
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "/etc/passwd")
    with refused(422, "symbolic link"):
        parse_archive(io.BytesIO(buffer.getvalue()), LIMITS)
    data = bytearray(zip_bytes({"a/1.png": IMAGES[0], "a/2.png": IMAGES[1]}))
    # Set the "encrypted" flag of the first entry, in its central directory record.
    central = data.find(b"PK\x01\x02")
    data[central + 8] |= 0x1
    with refused(422, "encrypted"):
        parse_archive(io.BytesIO(bytes(data)), LIMITS)


def test_tar_hard_links_and_devices_are_refused() -> None:
    for kind, words in ((tarfile.LNKTYPE, "link"), (tarfile.CHRTYPE, "not a regular file")):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            member = tarfile.TarInfo("a/x.png")
            member.type = kind
            member.linkname = "a/y.png"
            archive.addfile(member)
        with refused(422, words):
            parse_archive(io.BytesIO(buffer.getvalue()), LIMITS)


def test_too_many_images() -> None:
    limits = dataclasses.replace(LIMITS, max_images=3, min_images_per_class=1)
    files = {f"a/{i}.png": IMAGES[i] for i in range(4)}
    with refused(413, "at most 3"):
        parse_archive(io.BytesIO(zip_bytes(files)), limits)
    with refused(413, "more than 3 images"):
        parse_archive(io.BytesIO(tar_bytes(files)), limits)


def test_labelled_files() -> None:
    files = [(f"{i}.png", io.BytesIO(d)) for i, d in enumerate(IMAGES)]
    parsed = parse_labelled_files(files, ["x", "y", "x", "y"], LIMITS)
    assert (parsed.class_names, parsed.image_counts) == (("x", "y"), (2, 2))
    assert [streamed(u) for u in parsed.images()] == [IMAGES[0], IMAGES[1], IMAGES[2], IMAGES[3]]
    with refused(422, "control characters"):
        parse_labelled_files(files[:2], ["a\x07", "a\x07"], LIMITS)


def test_class_names() -> None:
    assert clean_class_name("  golden retriever ", 20, where="x") == "golden retriever"
    with refused(422, "at most 20"):
        clean_class_name("n" * 21, 20, where="x")
    with refused(422, "empty"):
        clean_class_name("\u3000", 20, where="x")  # an ideographic space


def test_archive_images_are_streamed_with_their_digests() -> None:
    files = {f"a/{i}.png": IMAGES[i] for i in range(4)}
    for data in (zip_bytes(files), tar_bytes(files)):
        images = list(parse_archive(io.BytesIO(data), LIMITS).images())
        assert [streamed(i) for i in images] == IMAGES
        assert [i.sha256 for i in images] == [hashlib.sha256(d).hexdigest() for d in IMAGES]


def test_a_listing_over_the_entry_limit_is_refused() -> None:
    limits = dataclasses.replace(LIMITS, max_archive_entries=5)
    files = {f"a/{i}.png": IMAGES[i % 4] for i in range(3)}
    dirs = tuple(f"empty{i}/" for i in range(3))  # folders count: the listing is 6 entries
    with refused(413, "DMC_MAX_ARCHIVE_ENTRIES"):
        parse_archive(io.BytesIO(zip_bytes(files, dirs)), limits)
    with refused(413, "DMC_MAX_ARCHIVE_ENTRIES"):
        parse_archive(io.BytesIO(tar_bytes({**files, **{f"._{i}": b"" for i in range(3)}})), limits)
    assert parse_archive(io.BytesIO(zip_bytes(files)), limits).image_counts == (3,)


def test_an_entry_over_the_image_byte_limit_is_refused_before_it_is_unpacked() -> None:
    limits = dataclasses.replace(LIMITS, max_image_bytes=len(IMAGES[0]) + 10)
    files = {"a/0.png": IMAGES[0], "a/big.png": IMAGES[1] + bytes(100)}
    with refused(413, "DMC_MAX_IMAGE_BYTES"):
        parse_archive(io.BytesIO(zip_bytes(files)), limits)
    with refused(413, "DMC_MAX_IMAGE_BYTES"):
        parse_archive(io.BytesIO(tar_bytes(files)), limits)
    labelled = [(name, io.BytesIO(data)) for name, data in files.items()]
    with refused(413, "DMC_MAX_IMAGE_BYTES"):
        parse_labelled_files(labelled, ["a", "a"], limits)


def test_a_corrupt_entry_is_422() -> None:
    data = bytearray(zip_bytes({"a/1.png": IMAGES[0], "a/2.png": IMAGES[1]}))
    at = bytes(data).index(IMAGES[0]) + len(IMAGES[0]) // 2
    data[at] ^= 0xFF  # the CRC no longer matches
    with refused(422, "the zip is corrupt"):
        parse_archive(io.BytesIO(bytes(data)), LIMITS)


def test_an_image_of_extreme_aspect_ratio_is_refused() -> None:
    limits = dataclasses.replace(LIMITS, max_image_aspect_ratio=20.0)
    buffer = io.BytesIO()
    Image.new("RGB", (3_000, 1)).save(buffer, format="PNG")
    files = {"a/0.png": IMAGES[0], "a/wide.png": buffer.getvalue()}
    with refused(422, "aspect ratio"):
        parse_archive(io.BytesIO(zip_bytes(files)), limits)
    parse_archive(io.BytesIO(zip_bytes(files)), LIMITS)  # no ratio limit: accepted
