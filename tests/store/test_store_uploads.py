"""A task's uploaded images: kept until its job has published, then deleted (or kept)."""

from __future__ import annotations

import pytest

from store.db import Database
from store.errors import ObjectIntegrityError
from store.jobs import Jobs
from store.objects import ObjectStore
from store.uploads import TaskUploads, UploadedImage

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
