"""A task's uploaded images: kept until its job has published, then deleted (or kept)."""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable
from typing import IO

import pytest

from store.db import Database
from store.errors import ObjectIntegrityError
from store.jobs import Jobs
from store.objects import ObjectStore
from store.uploads import ImageStream, TaskUploads, UploadedImage

IMAGES = [
    UploadedImage("cat", "cat-1.jpg", b"\xff\xd8cat one"),
    UploadedImage("cat", "cat-2.jpg", b"\xff\xd8cat two"),
    UploadedImage("dög", "dog.png", b"\x89PNG dog"),
]


def uploads_for(db: Database, objects: ObjectStore, *, keep: bool = False) -> TaskUploads:
    return TaskUploads(objects, Jobs(db), keep_uploads=keep, gc_grace_seconds=0)


def keys(objects: ObjectStore) -> set[str]:
    return {info.key for info in objects.list("tasks/")}


def test_save_load_release(db: Database, objects: ObjectStore) -> None:
    uploads = uploads_for(db, objects)
    location = uploads.save(IMAGES)
    assert location.startswith("tasks/") and location.endswith("/")
    assert uploads.load(location) == IMAGES

    task = uploads.jobs.submit(
        class_names=["cat", "dög"], image_counts=[2, 1], uploads_location=location
    ).task
    assert uploads.collect_garbage() == []  # referenced by the task

    assert uploads.release(task.id)
    assert keys(objects) == set()
    assert uploads.jobs.tasks.get(task.id).uploads_location is None
    assert not uploads.release(task.id)


def test_keep_uploads_setting(db: Database, objects: ObjectStore) -> None:
    uploads = uploads_for(db, objects, keep=True)
    location = uploads.save(IMAGES)
    task = uploads.jobs.submit(
        class_names=["cat", "dög"], image_counts=[2, 1], uploads_location=location
    ).task
    assert not uploads.release(task.id)
    assert uploads.load(location) == IMAGES


def test_altered_image_is_refused(db: Database, objects: ObjectStore) -> None:
    uploads = uploads_for(db, objects)
    location = uploads.save(IMAGES)
    objects.put_bytes(location + "images/000001", b"something else")
    with pytest.raises(ObjectIntegrityError):
        uploads.load(location)


def test_unreferenced_uploads_are_collected(db: Database, objects: ObjectStore) -> None:
    uploads = uploads_for(db, objects)
    orphan = uploads.save(IMAGES)  # saved, then the request died before the task row
    kept = uploads.save(IMAGES[:1])
    uploads.jobs.submit(class_names=["cat"], image_counts=[1], uploads_location=kept)
    assert uploads.collect_garbage(grace_seconds=3600) == []
    removed = uploads.collect_garbage()
    assert removed and all(key.startswith(orphan) for key in removed)
    assert all(key.startswith(kept) for key in keys(objects))


def test_empty_upload_is_refused(db: Database, objects: ObjectStore) -> None:
    uploads = uploads_for(db, objects)
    with pytest.raises(ValueError, match="at least one image"):
        uploads.save([])
    assert keys(objects) == set()


class _Chunked(io.BytesIO):
    """A stream that hands out at most `most` bytes a read and counts the largest read."""

    def __init__(self, data: bytes, most: int) -> None:
        super().__init__(data)
        self.most = most
        self.largest = 0

    def read(self, size: int | None = -1) -> bytes:
        wanted = self.most if size is None or size < 0 else min(size, self.most)
        self.largest = max(self.largest, wanted)
        return super().read(wanted)


def test_streamed_images_are_stored_in_chunks_and_checked(
    db: Database, objects: ObjectStore
) -> None:
    uploads = uploads_for(db, objects)
    data = bytes(range(256)) * 20_000  # 5 MB
    streams: list[_Chunked] = []

    def opener(payload: bytes) -> Callable[[], contextlib.AbstractContextManager[IO[bytes]]]:
        def open_() -> contextlib.AbstractContextManager[IO[bytes]]:
            streams.append(_Chunked(payload, 1 << 20))
            return contextlib.closing(streams[-1])

        return open_

    image = ImageStream("cat", "big.png", opener(data), sha256=hashlib.sha256(data).hexdigest())
    location = uploads.save([image, *IMAGES])
    assert uploads.load(location) == [UploadedImage("cat", "big.png", data), *IMAGES]
    assert 0 < streams[0].largest <= 1 << 20  # read a chunk at a time, never whole
    wrong = ImageStream("cat", "x.png", opener(b"other"), sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(ObjectIntegrityError):
        uploads.save([wrong])
    assert keys(objects) == {info.key for info in objects.list(location)}  # nothing left
