"""Removal of blobs that no row references (orphans of a crash, a failed write or a delete)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from datetime import timedelta

from store.models import utcnow
from store.objects import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)


def collect_unreferenced(
    objects: ObjectStore,
    root: str,
    referenced: Callable[[], set[str]],
    grace_seconds: float,
) -> list[str]:
    """Delete the objects of every `root/<id>/` folder not in `referenced()`; return their keys.

    A folder whose newest object is younger than `grace_seconds` is kept: its writer may
    still be about to commit the row that references it. The objects are listed before
    the references are read, so a row committed in between protects its folder.
    """
    folders: dict[str, list[ObjectInfo]] = defaultdict(list)
    for info in objects.list(f"{root}/"):
        parts = info.key.split("/")
        if len(parts) >= 3:
            folders[f"{parts[0]}/{parts[1]}/"].append(info)
    if not folders:
        return []
    keep = referenced()
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    removed: list[str] = []
    for folder, infos in sorted(folders.items()):
        if folder in keep or max(info.modified for info in infos) > cutoff:
            continue
        keys = sorted(info.key for info in infos)
        objects.delete_many(keys)
        removed.extend(keys)
        log.info("garbage collector removed %d unreferenced object(s) in %s", len(keys), folder)
    return removed


def collect_unreferenced_objects(
    objects: ObjectStore, prefix: str, referenced: set[str], grace_seconds: float
) -> list[str]:
    """Delete every object under `prefix` whose key is not in `referenced` and that is older
    than `grace_seconds`; return their keys. The caller holds what stops new references
    from appearing meanwhile (the registry: the versions lock)."""
    cutoff = utcnow() - timedelta(seconds=grace_seconds)
    garbage = sorted(
        info.key
        for info in objects.list(prefix)
        if info.key not in referenced and info.modified <= cutoff
    )
    if garbage:
        objects.delete_many(garbage)
        log.info("garbage collector removed %d unreferenced object(s) in %s", len(garbage), prefix)
    return garbage
