"""The uploaded images of a task, kept in the object store until its job has published."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, Any

from store.errors import ObjectIntegrityError, StoreError
from store.garbage import collect_unreferenced
from store.jobs import Jobs
from store.objects import ObjectStore, fresh_prefix

log = logging.getLogger(__name__)

TASKS_ROOT = "tasks"
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class UploadedImage:
    class_name: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class ImageStream:
    """An image to save, streamed to the object store from `open()` (never read whole);
    with `sha256`, the stored bytes must have that digest (`ObjectIntegrityError`)."""

    class_name: str
    filename: str
    open: Callable[[], AbstractContextManager[IO[bytes]]]
    sha256: str | None = None


class TaskUploads:
    def __init__(
        self,
        objects: ObjectStore,
        jobs: Jobs,
        *,
        keep_uploads: bool = False,
        gc_grace_seconds: float = 3600.0,
    ) -> None:
        self.objects = objects
        self.jobs = jobs
        self.keep_uploads = keep_uploads
        self.gc_grace_seconds = gc_grace_seconds

    def save(self, images: Iterable[UploadedImage | ImageStream]) -> str:
        """Store the images under a fresh prefix and return it (the task's uploads location).

        Save before `Jobs.submit`, so a job never starts without its images.
        """
        return save_images(self.objects, TASKS_ROOT, images)

    def load(self, location: str) -> list[UploadedImage]:
        """The images saved at `location`, each checked against its recorded sha256."""
        return load_images(self.objects, location)

    def release(self, task_id: int) -> bool:
        """Delete a task's images (call it once its job has published a version), unless
        the settings keep uploads. Returns whether anything was deleted."""
        task = self.jobs.tasks.get(task_id)
        if self.keep_uploads or task.uploads_location is None:
            return False
        self.jobs.tasks.set_uploads_location(task_id, None)
        self.discard(task.uploads_location)
        return True

    def discard(self, location: str) -> None:
        """Delete the images at `location` now (e.g. the duplicate of a replayed upload)."""
        discard_images(self.objects, location)

    def collect_garbage(self, *, grace_seconds: float | None = None) -> list[str]:
        """Remove uploads no task references (saved, then the request failed or crashed)."""
        grace = self.gc_grace_seconds if grace_seconds is None else grace_seconds
        return collect_unreferenced(
            self.objects, TASKS_ROOT, self.jobs.tasks.uploads_locations, grace
        )


def save_images(
    objects: ObjectStore, root: str, images: Iterable[UploadedImage | ImageStream]
) -> str:
    """Store labelled images under a fresh prefix below `root`, with a manifest written
    last, and return the prefix; on any failure nothing is left behind."""
    location = fresh_prefix(root)
    entries: list[dict[str, Any]] = []
    try:
        for index, image in enumerate(images):
            key = f"{location}images/{index:06d}"
            if isinstance(image, UploadedImage):
                digest = objects.put_bytes(key, image.data)
            else:
                with image.open() as stream:
                    digest = objects.put_stream(key, stream)
                if image.sha256 is not None and digest != image.sha256:
                    raise ObjectIntegrityError(key, image.sha256, digest)
            entries.append(
                {
                    "class_name": image.class_name,
                    "filename": image.filename,
                    "key": key[len(location) :],
                    "sha256": digest,
                }
            )
        if not entries:
            raise ValueError("an upload needs at least one image")
        manifest = json.dumps({"images": entries}, ensure_ascii=False).encode()
        objects.put_bytes(location + _MANIFEST, manifest)
    except Exception:
        discard_images(objects, location)
        raise
    return location


def load_images(objects: ObjectStore, location: str) -> list[UploadedImage]:
    """The images `save_images` stored at `location`, each checked against its sha256."""
    try:
        manifest = json.loads(objects.get_bytes(location + _MANIFEST))
        entries = manifest["images"]
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"the uploads manifest at {location} is unreadable") from error
    return [
        UploadedImage(
            class_name=entry["class_name"],
            filename=entry["filename"],
            data=objects.get_bytes(location + entry["key"], sha256=entry["sha256"]),
        )
        for entry in entries
    ]


def discard_images(objects: ObjectStore, location: str) -> None:
    """Delete the images at `location` now (logged, not raised, if that fails)."""
    try:
        objects.delete_prefix(location)
    except Exception:
        log.warning("could not delete the uploads at %s; the collector will", location)
