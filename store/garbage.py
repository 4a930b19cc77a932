"""Removal of blobs that no row references (orphans of a crash, a failed write or a delete),
and the database's record of what the scheduled collections removed (`GarbageLedger`)."""

from __future__ import annotations

import builtins
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import Database
from store.models import GarbageCount, utcnow
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


# The kinds of garbage the scheduled collection counts.
OBJECTS = "objects"
SCRATCH_FOLDERS = "scratch_folders"


@dataclass(frozen=True)
class GarbageTotal:
    kind: str
    total: int
    last_run_at: datetime | None


class GarbageLedger:
    """What the scheduled collections removed, in the database, so that every replica's
    /metrics reports the collections of every worker; and who collects the object store
    next (one process per interval)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, kind: str, interval_seconds: float) -> bool:
        """Whether this process collects `kind` now: True, and recorded as its latest run,
        unless a collection of it started less than `interval_seconds` ago anywhere."""
        now = utcnow()
        with self.db.write() as session:
            row = self._locked_row(session, kind)
            if row.last_run_at is not None and row.last_run_at > now - timedelta(
                seconds=interval_seconds
            ):
                return False
            row.last_run_at = now
            return True

    def add(self, kind: str, count: int) -> None:
        """Record that a collection of `kind` removed `count` things (just now)."""
        with self.db.write() as session:
            row = self._locked_row(session, kind)
            row.total += count
            row.last_run_at = utcnow()

    def totals(self) -> builtins.list[GarbageTotal]:
        with self.db.read() as session:
            rows = session.scalars(select(GarbageCount).order_by(GarbageCount.kind))
            return [GarbageTotal(r.kind, r.total, r.last_run_at) for r in rows]

    def _locked_row(self, session: Session, kind: str) -> GarbageCount:
        self.db.lock_table(session, GarbageCount.__tablename__)
        row = session.get(GarbageCount, kind)
        if row is None:
            row = GarbageCount(kind=kind, total=0, last_run_at=None)
            session.add(row)
        return row
