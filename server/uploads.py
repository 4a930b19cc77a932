"""Validation of the uploads of POST /classes: an archive with one folder per class, or
image files with a label each.

Everything is checked before anything is stored: paths, class names, image counts, and
every image (`server.images.check_image`). Each problem is an `UploadError` with an HTTP
status and a message that says what to fix.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import re
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any

from server.errors import UploadError
from server.images import ImageLimits, check_image
from server.settings import ServerSettings
from server.zip_listing import count_zip_entries
from store.names import class_name_problem, normalize_class_name
from store.uploads import ImageStream

# Files that archivers and desktops add; they are skipped, not refused.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_LISTED = 3
_CHUNK = 1 << 20


@dataclass(frozen=True)
class UploadLimits:
    max_image_pixels: int
    max_extracted_bytes: int
    max_images: int
    max_class_name_length: int
    min_images_per_class: int
    max_archive_entries: int
    max_image_bytes: int
    max_image_aspect_ratio: float = 0.0

    @property
    def image(self) -> ImageLimits:
        return ImageLimits(self.max_image_pixels, self.max_image_aspect_ratio)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> UploadLimits:
        return cls(
            max_image_pixels=settings.max_image_pixels,
            max_extracted_bytes=settings.max_extracted_bytes,
            max_images=settings.max_upload_images,
            max_class_name_length=settings.max_class_name_length,
            min_images_per_class=settings.min_images_per_class,
            max_archive_entries=settings.max_archive_entries,
            max_image_bytes=settings.max_image_bytes,
            max_image_aspect_ratio=settings.max_image_aspect_ratio,
        )


# --- class names ------------------------------------------------------------------------


def clean_class_name(raw: str, max_length: int, *, where: str) -> str:
    """A class name as stored: Unicode NFC, without surrounding spaces; refused if empty,
    over `max_length` characters, or holding control characters."""
    name = normalize_class_name(raw)
    problem = class_name_problem(name, max_length)
    if problem is not None:
        raise UploadError(422, f"{where}: {problem}")
    return name


# --- parsed uploads ---------------------------------------------------------------------


@dataclass
class _Entry:
    class_name: str
    filename: str
    ref: Any
    # Filled in when the entry has been checked.
    sha256: str | None = None


# Opens an entry's bytes as a stream (read in chunks, never whole).
OpenEntry = Callable[[Any], AbstractContextManager[IO[bytes]]]


@dataclass
class ParsedUpload:
    """A validated upload: its classes (sorted; the learner's label order) with image
    counts, a digest of its content, and its images, streamed again when they are stored."""

    class_names: tuple[str, ...]
    image_counts: tuple[int, ...]
    digest: str
    entries: list[_Entry] = field(repr=False)
    open_entry: OpenEntry = field(repr=False)

    def images(self) -> Iterator[ImageStream]:
        for entry in self.entries:
            yield ImageStream(
                entry.class_name,
                entry.filename,
                functools.partial(self.open_entry, entry.ref),
                sha256=entry.sha256,
            )


def _too_large(what: str, limit: int, setting: str) -> UploadError:
    return UploadError(
        413, f"{what} over {limit} bytes ({setting}); split the upload into several tasks"
    )


class _Budget:
    """The byte limits of an upload: per image (DMC_MAX_IMAGE_BYTES) and in all
    (DMC_MAX_EXTRACTED_BYTES), checked on declared sizes and again as bytes arrive."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.used = 0

    def declare(self, size: int, name: str) -> None:
        """An entry's size from the archive's listing, before it is unpacked."""
        self.check_entry(size, name)
        self.used += size
        self.check_total()

    def check_entry(self, size: int, name: str) -> None:
        if size > self.limits.max_image_bytes:
            raise _too_large(
                f"{name} unpacks to", self.limits.max_image_bytes, "DMC_MAX_IMAGE_BYTES"
            )

    def check_total(self) -> None:
        if self.used > self.limits.max_extracted_bytes:
            raise _too_large(
                "the images add up to", self.limits.max_extracted_bytes, "DMC_MAX_EXTRACTED_BYTES"
            )

    def read(self, stream: IO[bytes], name: str) -> bytes:
        """The entry's bytes, refused as soon as they go over either limit."""
        data = bytearray()
        while chunk := stream.read(_CHUNK):
            data += chunk
            self.used += len(chunk)
            self.check_entry(len(data), name)
            self.check_total()
        return bytes(data)


def _finish(
    entries: list[_Entry],
    open_entry: OpenEntry,
    limits: UploadLimits,
    empty: set[str],
    kind: str = "upload",
) -> ParsedUpload:
    """Check counts, then every image; compute the digest. A `kind` (zip, tar) that cannot
    be read is said to be corrupt."""
    if empty:
        listed = ", ".join(repr(n) for n in sorted(empty)[:_LISTED])
        raise UploadError(
            422, f"class folder(s) {listed} hold no images; add images or remove the folder"
        )
    if not entries:
        raise UploadError(422, "the upload holds no images")
    if len(entries) > limits.max_images:
        raise UploadError(
            413,
            f"the upload holds {len(entries)} images; at most {limits.max_images} are allowed "
            "in one upload (DMC_MAX_UPLOAD_IMAGES): split it into several tasks",
        )
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.class_name] = counts.get(entry.class_name, 0) + 1
    names = tuple(sorted(counts))
    short = [n for n in names if counts[n] < limits.min_images_per_class]
    if short:
        listed = ", ".join(f"{n!r} has {counts[n]}" for n in short[:_LISTED])
        raise UploadError(
            422,
            f"every class needs at least {limits.min_images_per_class} images "
            f"(DMC_MIN_IMAGES_PER_CLASS): {listed}",
        )
    budget = _Budget(limits)
    digests: list[str] = []
    for entry in entries:
        name = f"image {entry.filename!r} (class {entry.class_name!r})"
        with _unpacking(entry.filename, kind), open_entry(entry.ref) as stream:
            data = budget.read(stream, name)
        check_image(data, name, limits.image)
        entry.sha256 = hashlib.sha256(data).hexdigest()
        del data
        digests.append(f"{entry.class_name}\x00{entry.sha256}")
    digest = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return ParsedUpload(
        class_names=names,
        image_counts=tuple(counts[n] for n in names),
        digest=digest,
        entries=entries,
        open_entry=open_entry,
    )


# --- image files with labels ------------------------------------------------------------


def parse_labelled_files(
    files: Sequence[tuple[str | None, IO[bytes]]], labels: Sequence[str], limits: UploadLimits
) -> ParsedUpload:
    """Image files with one label each, in the same order."""
    if len(files) != len(labels):
        raise UploadError(
            422,
            f"{len(files)} images but {len(labels)} labels: send one `labels` field per "
            "image, in the same order as the `images` files",
        )
    entries = []
    for index, ((filename, _), label) in enumerate(zip(files, labels, strict=True)):
        shown = filename or f"#{index + 1}"
        name = clean_class_name(
            label, limits.max_class_name_length, where=f"label of image {shown!r}"
        )
        entries.append(_Entry(name, filename or f"image-{index + 1}", index))

    def open_file(ref: Any) -> AbstractContextManager[IO[bytes]]:
        stream = files[int(ref)][1]
        stream.seek(0)
        return contextlib.nullcontext(stream)  # the form closes its files

    return _finish(entries, open_file, limits, empty=set())


# --- archives ---------------------------------------------------------------------------


def _entry_parts(name: str) -> tuple[str, ...]:
    """The components of an archive path; refuses absolute paths and `..`."""
    path = name.replace("\\", "/")
    if "\x00" in path:
        raise UploadError(422, f"archive entry {name!r} has a NUL character in its path")
    if path.startswith("/") or _DRIVE.match(path):
        raise UploadError(
            422,
            f"archive entry {name!r} has an absolute path; archive relative paths "
            "(class_name/image.jpg)",
        )
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UploadError(
            422,
            f"archive entry {name!r} has '..' in its path; archive relative paths "
            "(class_name/image.jpg) only",
        )
    return parts


def _is_junk(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in _JUNK_NAMES for p in parts)


def _layout(
    files: list[tuple[tuple[str, ...], Any]], dirs: set[tuple[str, ...]], limits: UploadLimits
) -> tuple[list[_Entry], set[str]]:
    """One folder per class, optionally all inside one top folder."""
    strip = 0
    if files and all(len(p) == 3 for p, _ in files) and len({p[0] for p, _ in files}) == 1:
        strip = 1
        top = files[0][0][0]
        dirs = {d[1:] for d in dirs if d[:1] == (top,) and len(d) > 1}
    entries: list[_Entry] = []
    names: dict[str, str] = {}

    def class_name(folder: str) -> str:
        if folder not in names:
            names[folder] = clean_class_name(
                folder, limits.max_class_name_length, where=f"archive folder {folder!r}"
            )
        return names[folder]

    for parts, ref in files:
        rest = parts[strip:]
        if len(rest) != 2:
            raise UploadError(
                422,
                f"archive entry {'/'.join(parts)!r} is not inside a class folder; the archive "
                "holds one folder per class, each with its images: <class name>/<image file>",
            )
        entries.append(_Entry(class_name(rest[0]), "/".join(parts), ref))
    with_images = {e.class_name for e in entries}
    empty = {class_name(d[0]) for d in dirs if len(d) == 1} - with_images
    return entries, empty


def _listing_too_long(limits: UploadLimits) -> UploadError:
    return UploadError(
        413,
        f"the archive lists more than {limits.max_archive_entries} entries (files and "
        "folders; DMC_MAX_ARCHIVE_ENTRIES); split it into several tasks",
    )


@contextlib.contextmanager
def _unpacking(name: str, kind: str) -> Iterator[None]:
    """An archive's read errors, as the 422 that says the archive is corrupt (only while
    an entry is checked: errors of the object store, later, are not the upload's)."""
    try:
        yield
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, OSError, EOFError) as exc:
        raise UploadError(
            422, f"archive entry {name!r} cannot be unpacked ({exc}); the {kind} is corrupt"
        ) from exc


def _parse_zip(archive: zipfile.ZipFile, limits: UploadLimits) -> ParsedUpload:
    files: list[tuple[tuple[str, ...], Any]] = []
    dirs: set[tuple[str, ...]] = set()
    declared = _Budget(limits)
    for info in archive.infolist():
        parts = _entry_parts(info.filename)
        if not parts or _is_junk(parts):
            continue
        if info.is_dir():
            dirs.add(parts)
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadError(
                422, f"archive entry {info.filename!r} is a symbolic link; archive image files"
            )
        if info.flag_bits & 0x1:
            raise UploadError(
                422, f"archive entry {info.filename!r} is encrypted; upload an unencrypted archive"
            )
        # `zipfile` never unpacks more than an entry's declared size.
        declared.declare(info.file_size, f"archive entry {info.filename!r}")
        files.append((parts, info))
        dirs.update(parts[:i] for i in range(1, len(parts)))
    entries, empty = _layout(files, dirs, limits)

    def open_entry(ref: Any) -> AbstractContextManager[IO[bytes]]:
        return archive.open(ref)

    return _finish(entries, open_entry, limits, empty, "zip")


def _parse_tar(archive: tarfile.TarFile, limits: UploadLimits) -> ParsedUpload:
    files: list[tuple[tuple[str, ...], Any]] = []
    dirs: set[tuple[str, ...]] = set()
    declared = _Budget(limits)
    listed = 0
    try:
        for member in archive:
            listed += 1
            if listed > limits.max_archive_entries:
                raise _listing_too_long(limits)
            parts = _entry_parts(member.name)
            if not parts or _is_junk(parts):
                continue
            if member.isdir():
                dirs.add(parts)
                continue
            if member.issym() or member.islnk():
                raise UploadError(
                    422, f"archive entry {member.name!r} is a link; archive image files only"
                )
            if not member.isfile():
                raise UploadError(
                    422, f"archive entry {member.name!r} is not a regular file; archive images only"
                )
            declared.declare(member.size, f"archive entry {member.name!r}")
            if len(files) >= limits.max_images:
                raise UploadError(
                    413,
                    f"the archive holds more than {limits.max_images} images "
                    "(DMC_MAX_UPLOAD_IMAGES); split it into several tasks",
                )
            files.append((parts, member))
            dirs.update(parts[:i] for i in range(1, len(parts)))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UploadError(422, f"the tar archive is corrupt or truncated: {exc}") from exc
    entries, empty = _layout(files, dirs, limits)

    def open_entry(ref: Any) -> AbstractContextManager[IO[bytes]]:
        stream = archive.extractfile(ref)
        if stream is None:
            raise UploadError(422, f"archive entry {ref.name!r} cannot be read")
        return stream

    return _finish(entries, open_entry, limits, empty, "tar")


def parse_archive(stream: IO[bytes], limits: UploadLimits) -> ParsedUpload:
    """A zip or tar (optionally gzip, bzip2 or xz compressed) archive with one folder per
    class. `stream` must be seekable and stay open while the upload's images are read."""
    stream.seek(0, io.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    if size == 0:
        raise UploadError(422, "the archive is empty (0 bytes)")
    if zipfile.is_zipfile(stream):
        listed = count_zip_entries(stream, limits.max_archive_entries)
        if listed is not None and listed > limits.max_archive_entries:
            raise _listing_too_long(limits)
        stream.seek(0)
        try:
            return _parse_zip(zipfile.ZipFile(stream), limits)
        except zipfile.BadZipFile as exc:
            raise UploadError(422, f"the zip archive is corrupt: {exc}") from exc
    stream.seek(0)
    try:
        # Not a context manager: the images are read again when they are stored.
        archive = tarfile.open(fileobj=stream, mode="r:*")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UploadError(
            422,
            "the archive is neither a zip nor a tar file (plain, .gz, .bz2 or .xz); "
            "send one of those",
        ) from exc
    return _parse_tar(archive, limits)
