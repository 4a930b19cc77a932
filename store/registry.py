"""The model-version registry: publish, activate (and roll back), read, load, delete, collect."""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dmc_core.state_files import MANIFEST, Part, files_of_part
from store.db import Database
from store.errors import (
    ClassNotFoundError,
    ObjectIntegrityError,
    ObjectNotFoundError,
    StaleParentError,
    StateIntegrityError,
    TaskNotFoundError,
    VersionInUseError,
    VersionNotFoundError,
)
from store.garbage import collect_unreferenced, collect_unreferenced_objects
from store.lineage import ClassChange
from store.models import (
    ACTIVE_ALIAS,
    PENDING_STATES,
    Alias,
    ClassRecord,
    Job,
    Task,
    TaskKind,
    Version,
    utcnow,
)
from store.names import class_name_problem
from store.objects import (
    BLOBS_ROOT,
    ObjectStore,
    content_key,
    fresh_prefix,
    sha256_bytes,
    sha256_file,
    state_checksum,
    validate_key,
)
from store.tasks import ClassRow

log = logging.getLogger(__name__)

# Versions published before content addressing keep their files under
# `versions/<hex>/<name>`; newer ones store each file once, at `blobs/<sha256>`, and their
# (unique) `state_location` only names them.
VERSIONS_ROOT = "versions"

# A state: a folder of files (what dmc_core.state writes), or file name -> content.
StateSource = Path | str | Mapping[str, bytes]

# Called inside the publish transaction with the new version; raising aborts the publish.
Finalizer = Callable[[Session, "VersionInfo"], None]


@dataclass(frozen=True)
class VersionInfo:
    id: int
    parent_id: int | None
    created_at: datetime
    class_count: int
    metrics: dict[str, Any]
    state_location: str
    checksum: str
    files: dict[str, str]  # file name -> sha256
    size_bytes: int  # all its files
    new_classes: tuple[str, ...] = field(default=())
    # What it changed against its parent (`ClassChange.as_json()`).
    change: dict[str, Any] = field(default_factory=dict)
    # What storing it cost: its blobs that no version stored before it did.
    added_bytes: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # file name -> object key


class Registry:
    def __init__(
        self, db: Database, objects: ObjectStore, *, gc_grace_seconds: float = 3600.0
    ) -> None:
        self.db = db
        self.objects = objects
        self.gc_grace_seconds = gc_grace_seconds

    # --- writing -------------------------------------------------------------------

    def publish(
        self,
        state: StateSource,
        *,
        parent_id: int | None,
        metrics: Mapping[str, Any] | None = None,
        new_classes: Sequence[str] = (),
        task_id: int | None = None,
        class_count: int | None = None,
        activate: bool = False,
        require_newest_parent: bool = False,
        finalize: Finalizer | None = None,
        change: ClassChange | None = None,
    ) -> VersionInfo:
        """Store `state` as a new version built on `parent_id` and return it.

        The blobs are written first under a fresh prefix; then one transaction inserts the
        version, its classes (the parent's changed by `change`, by default the addition of
        `new_classes`; names are unique within a version: `DuplicateClassError`, and a
        change of a class the parent lacks is `ClassNotFoundError`) and, with
        `activate`, moves the `active` alias. `parent_id` is recorded as given; with
        `require_newest_parent` the publish is refused (`StaleParentError`) unless the parent
        is still the newest version. `class_count` defaults to the parent's plus the new.
        `finalize(session, version)` runs inside the transaction just before it commits
        (e.g. to mark the job that built the state succeeded); if it raises, nothing is
        published.
        """
        sources = dict(_state_sources(state))
        if change is None:
            change = ClassChange(TaskKind.ADD, _validate_class_names(new_classes))
        else:
            _validate_class_names(change.added)
        location = fresh_prefix(VERSIONS_ROOT)
        uploaded: builtins.list[str] = []
        try:
            files: dict[str, dict[str, Any]] = {}
            for name, source in sources.items():
                digest, size = _digest(source)
                key = content_key(digest)
                if not self.objects.exists(key):
                    self._put(key, source, digest)
                    uploaded.append(key)
                files[name] = {"sha256": digest, "size": size, "key": key}
            checksum = state_checksum({n: f["sha256"] for n, f in files.items()})
            with self.db.write() as session:
                info = self._insert(
                    session,
                    parent_id=parent_id,
                    metrics=dict(metrics or {}),
                    change=change,
                    task_id=task_id,
                    class_count=class_count,
                    location=location,
                    checksum=checksum,
                    files=files,
                    sources=sources,
                    activate=activate,
                    require_newest_parent=require_newest_parent,
                )
                if finalize is not None:
                    finalize(session, info)
        except Exception:
            # Best effort; whatever is left (or a crash) is the garbage collector's.
            try:
                self._delete_unreferenced(uploaded)
            except Exception:
                log.warning("could not remove the blobs of a failed publish of %s", location)
            raise
        log.info(
            "published version %d (parent %s): %d of %d bytes new",
            info.id,
            parent_id,
            info.added_bytes,
            info.size_bytes,
        )
        return info

    def _put(self, key: str, source: bytes | Path, digest: str) -> None:
        if isinstance(source, bytes):
            stored = self.objects.put_bytes(key, source)
        else:
            stored = self.objects.put_file(key, source)
        if stored != digest:
            self.objects.delete(key)
            raise ObjectIntegrityError(key, digest, stored)

    def _delete_unreferenced(self, keys: builtins.list[str]) -> builtins.list[str]:
        """Remove those of `keys` that no version references. Under the publishers' lock:
        a publisher re-checks, under the same lock, that the blobs it reuses still exist."""
        if not keys:
            return []
        with self.db.write() as session:
            self.db.lock_table(session, Version.__tablename__)
            referenced = _referenced_keys(session)
            garbage = sorted(set(keys) - referenced)
            self.objects.delete_many(garbage)
        return garbage

    def _insert(
        self,
        session: Session,
        *,
        parent_id: int | None,
        metrics: dict[str, Any],
        change: ClassChange,
        task_id: int | None,
        class_count: int | None,
        location: str,
        checksum: str,
        files: dict[str, dict[str, Any]],
        sources: Mapping[str, bytes | Path],
        activate: bool,
        require_newest_parent: bool,
    ) -> VersionInfo:
        # Publishers, deleters and the garbage collector take turns, so the checks below
        # hold until commit.
        self.db.lock_table(session, Version.__tablename__)
        referenced = _referenced_keys(session)
        for name, entry in files.items():
            entry["new"] = entry["key"] not in referenced
            # A blob found before the lock may since have been collected as garbage.
            if entry["new"] and not self.objects.exists(entry["key"]):
                self._put(entry["key"], sources[name], entry["sha256"])
        parent = None
        if parent_id is not None:
            parent = session.get(Version, parent_id)
            if parent is None:
                raise VersionNotFoundError(parent_id)
        if task_id is not None and session.get(Task, task_id) is None:
            raise TaskNotFoundError(task_id)
        if require_newest_parent:
            newest = session.scalar(select(func.max(Version.id)))
            if newest != parent_id:
                raise StaleParentError(parent_id, newest)
        inherited = {r.name: r for r in _class_records(session, parent_id)}
        try:
            names = change.apply(builtins.list(inherited))
        except ClassNotFoundError as error:
            raise ClassNotFoundError(error.names, parent_id) from None
        if class_count is None:
            class_count = len(names)
        row = Version(
            parent_id=parent_id,
            created_at=utcnow(),
            class_count=class_count,
            metrics=metrics,
            state_location=location,
            checksum=checksum,
            files=files,
            change=change.as_json(),
        )
        session.add(row)
        session.flush()
        origin = {new: old for old, new in change.renamed.items()}
        records = []
        for i, name in enumerate(names):
            before = inherited.get(origin.get(name, name))
            records.append(
                ClassRecord(
                    name=name,
                    ordinal=i,
                    version_id=row.id,
                    task_id=task_id if before is None else before.task_id,
                    since_version_id=row.id if before is None else before.since_version_id,
                )
            )
        session.add_all(records)
        if activate:
            _point_alias(session, ACTIVE_ALIAS, row.id)
        session.flush()
        return _info(row)

    def activate(self, version_id: int) -> VersionInfo:
        """Make `version_id` the active version; activating an older one is a rollback."""
        with self.db.write() as session:
            row = session.get(Version, version_id)
            if row is None:
                raise VersionNotFoundError(version_id)
            _point_alias(session, ACTIVE_ALIAS, version_id)
            info = _info(row)
        log.info("version %d is now active", version_id)
        return info

    def delete(self, version_id: int, *, cascade: bool = False) -> builtins.list[int]:
        """Delete a version and its blobs (those no other version shares); returns the ids
        deleted. Refused while an alias points at it or a queued or running task builds on
        it, and while other versions build on it unless `cascade`, which deletes its whole
        subtree (refused likewise if any of it is in use)."""
        with self.db.write() as session:
            self.db.lock_table(session, Version.__tablename__)
            if session.get(Version, version_id) is None:
                raise VersionNotFoundError(version_id)
            _refuse_in_use(session, version_id, [version_id])
            subtree = _subtree(session, version_id)
            children = session.scalars(
                select(Version.id).where(Version.parent_id == version_id).order_by(Version.id)
            ).all()
            if children and not cascade:
                listed = ", ".join(str(c) for c in children)
                raise VersionInUseError(
                    version_id, f"versions {listed} build on it (delete them too with cascade)"
                )
            _refuse_in_use(session, version_id, subtree)
            rows = session.scalars(select(Version).where(Version.id.in_(subtree))).all()
            locations = [row.state_location for row in rows]
            keys = [key for row in rows for key in _keys(row).values()]
            try:
                # Children first: a parent is never deleted before what builds on it.
                for vid in sorted(subtree, reverse=True):
                    session.execute(delete(Version).where(Version.id == vid))
                session.flush()
            except IntegrityError as error:
                raise VersionInUseError(version_id, "it is referenced") from error
        try:
            self._delete_unreferenced(keys)
            for location in locations:
                self.objects.delete_prefix(location)
        except Exception:
            log.warning("could not remove the blobs of deleted versions %s", subtree)
        log.info("deleted versions %s", sorted(subtree))
        return sorted(subtree)

    def collect_garbage(self, *, grace_seconds: float | None = None) -> builtins.list[str]:
        """Remove version blobs no version row references; return the removed keys."""

        def referenced() -> set[str]:
            with self.db.read() as session:
                return set(session.scalars(select(Version.state_location)))

        grace = self.gc_grace_seconds if grace_seconds is None else grace_seconds
        removed = collect_unreferenced(self.objects, VERSIONS_ROOT, referenced, grace)
        with self.db.write() as session:
            # Under the publishers' lock: see `_delete_unreferenced`.
            self.db.lock_table(session, Version.__tablename__)
            removed += collect_unreferenced_objects(
                self.objects, f"{BLOBS_ROOT}/", _referenced_keys(session), grace
            )
        return removed

    # --- reading -------------------------------------------------------------------

    def get(self, version_id: int) -> VersionInfo:
        with self.db.read() as session:
            row = session.get(Version, version_id)
            if row is None:
                raise VersionNotFoundError(version_id)
            return _info(row)

    def list(self, *, limit: int | None = None, offset: int = 0) -> builtins.list[VersionInfo]:
        """Versions, newest first."""
        query = select(Version).order_by(Version.id.desc()).offset(offset).limit(limit)
        return self._infos(query)

    def active(self) -> VersionInfo | None:
        query = select(Version).join(Alias, Alias.version_id == Version.id)
        return next(iter(self._infos(query.where(Alias.name == ACTIVE_ALIAS))), None)

    def newest(self) -> VersionInfo | None:
        """The version with the highest id (the latest published)."""
        return next(iter(self.list(limit=1)), None)

    def class_names(self, version_id: int) -> builtins.list[str]:
        """Every class of a version, in label order."""
        return [c.name for c in self.classes(version_id)]

    def classes(self, version_id: int) -> builtins.list[ClassRow]:
        """Every class of a version, in label order, with the version that first learned
        it and the task that brought it."""
        with self.db.read() as session:
            if session.get(Version, version_id) is None:
                raise VersionNotFoundError(version_id)
            return [
                ClassRow(r.name, r.since_version_id or r.version_id, r.task_id)
                for r in _class_records(session, version_id)
            ]

    def load_state(
        self, version_id: int, dest: Path | str | None = None, *, part: Part = "full"
    ) -> Path:
        """Materialise a version's state as a folder and return its path.

        `part="inference"` fetches only the files its manifest lists for inference (what
        an API replica needs); "full" fetches every file.
        `dest` must not exist or be an empty folder; None makes a fresh temporary folder.
        Each blob is checked against its recorded sha256 and the file list against the
        version checksum; on any mismatch nothing is left at `dest` and
        `StateIntegrityError` is raised.
        """
        info = self.get(version_id)
        if state_checksum(info.files) != info.checksum:
            raise StateIntegrityError(
                version_id, "its recorded file list does not match the version checksum"
            )
        if dest is None:
            target = Path(tempfile.mkdtemp(prefix=f"dmc-version-{version_id}-"))
            staging = target
        else:
            target = Path(dest)
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise FileExistsError(f"{target} exists and is not an empty folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            if part == "full":
                names = sorted(info.files)
            else:  # the manifest says which files the part needs
                self._fetch(info, MANIFEST, staging)
                names = [n for n in self._part_files(info, staging, part) if n != MANIFEST]
            for name in names:
                self._fetch(info, name, staging)
            if staging != target:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _fetch(self, info: VersionInfo, name: str, folder: Path) -> None:
        try:
            self.objects.get_file(
                info.keys[name], folder.joinpath(*name.split("/")), sha256=info.files[name]
            )
        except ObjectIntegrityError as error:
            raise StateIntegrityError(
                info.id,
                f"file {name!r} was altered (sha256 {error.actual}, recorded {error.expected})",
            ) from error
        except ObjectNotFoundError as error:
            raise StateIntegrityError(info.id, f"file {name!r} is missing") from error

    def _part_files(self, info: VersionInfo, folder: Path, part: Part) -> builtins.list[str]:
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            names = files_of_part(manifest, part)
        except (ValueError, AttributeError) as error:
            raise StateIntegrityError(info.id, f"its manifest is unusable: {error}") from error
        unknown = sorted(set(names) - set(info.files))
        if unknown:
            raise StateIntegrityError(info.id, f"its manifest lists unknown files {unknown}")
        return names

    def _infos(self, query: Select[Version]) -> builtins.list[VersionInfo]:
        with self.db.read() as session:
            return [_info(row) for row in session.scalars(query).all()]


def _keys(row: Version) -> dict[str, str]:
    return _file_keys(row.state_location, row.files)


def _file_keys(location: str, files: dict[str, Any]) -> dict[str, str]:
    # Versions from before content addressing have no key: their files are under `location`.
    return {name: entry.get("key") or location + name for name, entry in files.items()}


def _referenced_keys(session: Session) -> set[str]:
    """The object keys of every version's files."""
    keys: set[str] = set()
    rows = session.execute(select(Version.state_location, Version.files)).tuples()
    for location, files in rows:
        keys.update(_file_keys(location, files).values())
    return keys


def _added_bytes(row: Version) -> int:
    # Files of versions from before content addressing were all stored anew.
    added = {
        entry.get("key", name): int(entry.get("size", 0))
        for name, entry in row.files.items()
        if entry.get("new", True)
    }
    return sum(added.values())


def _digest(source: bytes | Path) -> tuple[str, int]:
    if isinstance(source, bytes):
        return sha256_bytes(source), len(source)
    return sha256_file(source), source.stat().st_size


def _info(row: Version) -> VersionInfo:
    change = ClassChange.from_json(row.change)
    return VersionInfo(
        id=row.id,
        parent_id=row.parent_id,
        created_at=row.created_at,
        class_count=row.class_count,
        metrics=dict(row.metrics),
        state_location=row.state_location,
        checksum=row.checksum,
        files={name: f["sha256"] for name, f in row.files.items()},
        size_bytes=sum(int(f.get("size", 0)) for f in row.files.values()),
        new_classes=change.added if change.kind == TaskKind.ADD else (),
        change=change.as_json(),
        added_bytes=_added_bytes(row),
        keys=_keys(row),
    )


def _class_records(session: Session, version_id: int | None) -> list[ClassRecord]:
    if version_id is None:
        return []
    query = (
        select(ClassRecord)
        .where(ClassRecord.version_id == version_id)
        .order_by(ClassRecord.ordinal)
    )
    return list(session.scalars(query))


def _subtree(session: Session, version_id: int) -> list[int]:
    """The version and every version that builds on it, directly or not."""
    found, frontier = [version_id], [version_id]
    while frontier:
        frontier = list(session.scalars(select(Version.id).where(Version.parent_id.in_(frontier))))
        found += frontier
    return found


def _refuse_in_use(session: Session, version_id: int, subtree: list[int]) -> None:
    """`VersionInUseError` if an alias points into `subtree` or a pending task builds on it."""
    aliases = session.execute(
        select(Alias.name, Alias.version_id).where(Alias.version_id.in_(subtree))
    ).all()
    for name, vid in sorted(aliases):
        if name == ACTIVE_ALIAS:
            which = "it is" if vid == version_id else f"version {vid} (in its subtree) is"
            raise VersionInUseError(
                version_id, f"{which} the active version; activate another version first"
            )
    if aliases:
        names = ", ".join(sorted(name for name, _ in aliases))
        raise VersionInUseError(version_id, f"aliases {names} point at it")
    pending = session.scalars(
        select(Task.id)
        .join(Job, Job.task_id == Task.id)
        .where(Task.base_version_id.in_(subtree), Job.state.in_(PENDING_STATES))
        .order_by(Task.id)
    ).all()
    if pending:
        listed = ", ".join(str(t) for t in pending)
        raise VersionInUseError(version_id, f"queued tasks {listed} build on it")


def _point_alias(session: Session, name: str, version_id: int) -> None:
    dialect = session.get_bind().dialect.name
    values = {"name": name, "version_id": version_id, "updated_at": utcnow()}
    update = {"version_id": version_id, "updated_at": values["updated_at"]}
    if dialect == "postgresql":
        pg = postgresql.insert(Alias).values(**values)
        session.execute(pg.on_conflict_do_update(index_elements=[Alias.name], set_=update))
    elif dialect == "sqlite":
        lite = sqlite.insert(Alias).values(**values)
        session.execute(lite.on_conflict_do_update(index_elements=[Alias.name], set_=update))
    else:
        session.merge(Alias(**values))


def _state_sources(state: StateSource) -> list[tuple[str, bytes | Path]]:
    if isinstance(state, Mapping):
        sources: list[tuple[str, bytes | Path]] = [
            (validate_key(str(name)), bytes(data)) for name, data in state.items()
        ]
    else:
        root = Path(state)
        if not root.is_dir():
            raise NotADirectoryError(f"a state is a folder of files; {root} is not a folder")
        sources = [
            (validate_key(path.relative_to(root).as_posix()), path)
            for path in sorted(root.rglob("*"))
            if path.is_file()
        ]
    if not sources:
        raise ValueError("the state holds no files")
    return sorted(sources, key=lambda item: item[0])


def _validate_class_names(names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        raise TypeError("new_classes is a sequence of class names, not one string")
    cleaned = tuple(names)
    for name in cleaned:
        problem = class_name_problem(name) if isinstance(name, str) else "not a string"
        if problem is not None:
            raise ValueError(f"invalid class name {name!r}: {problem}")
    duplicates = sorted({n for n in cleaned if cleaned.count(n) > 1})
    if duplicates:
        raise ValueError(f"class names given more than once: {', '.join(duplicates)}")
    return cleaned
