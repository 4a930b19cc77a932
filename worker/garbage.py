"""What crashes leave behind, collected on a schedule: unreferenced objects (the uploads of
a request that died before its task was recorded, the blobs of an unfinished publish) and
the `dmc-job-*` scratch folders of runs that were killed.

Both dispatchers run `GarbageSchedule.run_if_due` in their idle loop: the embedded thread,
and each Celery worker's sweeper. The object store is shared, so one process per interval
collects it (`GarbageLedger.claim`); scratch folders are local to a machine, so every
worker collects its own. Nothing younger than `gc_grace_seconds` is touched, and a run's
scratch folder is locked (`flock`) while the run uses it, however old it is. What was
removed is counted in the database and reported by every replica's /metrics.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from store.garbage import OBJECTS, SCRATCH_FOLDERS
from store.service import Store
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "dmc-job-"
_LOCK_FILE = ".lock"


class Scratch:
    """A job run's scratch folder, locked until `remove` (or the process's death)."""

    def __init__(self, job_id: int, root: Path | None) -> None:
        self.path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-", dir=root))
        self._lock: IO[bytes] = (self.path / _LOCK_FILE).open("wb")
        fcntl.flock(self._lock, fcntl.LOCK_EX)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._lock.close()


def scratch_root(work_dir: Path | None) -> Path:
    """Where the runs' scratch folders are made (`Scratch(..., root=work_dir)`)."""
    return Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())


def collect_scratch(root: Path, grace_seconds: float) -> list[Path]:
    """Remove the `dmc-job-*` folders under `root` unchanged for `grace_seconds` that no
    run holds; return them."""
    cutoff = time.time() - grace_seconds
    removed = []
    for folder in sorted(root.glob(f"{SCRATCH_PREFIX}*")):
        try:
            if folder.is_symlink() or not folder.is_dir() or folder.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        if _remove_unless_held(folder):
            removed.append(folder)
    return removed


def _remove_unless_held(folder: Path) -> bool:
    try:
        lock = os.open(folder / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live run's folder
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    finally:
        os.close(lock)


@dataclass(frozen=True)
class GarbageReport:
    objects: list[str]
    scratch_folders: list[Path]


class GarbageSchedule:
    """Collects garbage every `gc_interval_seconds` (0: never), the first time at once."""

    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self._next = clock()

    @property
    def seconds_to_next(self) -> float | None:
        if self.settings.gc_interval_seconds <= 0:
            return None
        return max(0.0, self._next - self.clock())

    def run_if_due(self) -> GarbageReport | None:
        """Collect if it is time (errors are logged: the next run tries again)."""
        interval = self.settings.gc_interval_seconds
        if interval <= 0 or self.clock() < self._next:
            return None
        self._next = self.clock() + interval
        try:
            return self.collect()
        except Exception as error:
            log.warning("garbage collection failed: %s; it runs again later", error)
            return None

    def collect(self) -> GarbageReport:
        ledger = self.store.garbage
        objects: list[str] = []
        # Half an interval: processes that wake at slightly different times still take
        # turns rather than skip a whole interval.
        if ledger.claim(OBJECTS, self.settings.gc_interval_seconds / 2):
            objects = self.store.collect_garbage()
            ledger.add(OBJECTS, len(objects))
        root = scratch_root(self.settings.work_dir)
        folders = collect_scratch(root, self.settings.gc_grace_seconds)
        ledger.add(SCRATCH_FOLDERS, len(folders))
        if objects or folders:
            log.info(
                "garbage collection removed %d object(s) and %d scratch folder(s) in %s",
                len(objects),
                len(folders),
                root,
            )
        return GarbageReport(objects, folders)
