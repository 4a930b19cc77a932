"""What crashes leave behind is collected on a schedule: unreferenced uploads and the
`dmc-job-*` scratch folders of dead runs older than the grace period, never younger ones
nor the folder of a live run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from store.garbage import OBJECTS, SCRATCH_FOLDERS
from store.service import Store
from tests.worker.helpers import make_settings, wait_for
from worker.embedded import EmbeddedDispatcher
from worker.garbage import GarbageSchedule, Scratch, collect_scratch
from worker.settings import WorkerSettings

GRACE = 600.0
OLD = time.time() - 2 * GRACE


@pytest.fixture
def settings(tmp_path: Path, checkpoint: Path, sqlite_template: Path) -> WorkerSettings:
    database = tmp_path / "dmc.sqlite"
    shutil.copyfile(sqlite_template, database)
    (tmp_path / "work").mkdir()
    return make_settings(
        database_url=f"sqlite:///{database}",
        objects_dir=tmp_path / "objects",
        checkpoint=checkpoint,
        work_dir=tmp_path / "work",
        gc_grace_seconds=GRACE,
        gc_interval_seconds=0.2,
        job_sweep_seconds=30.0,
    )


@pytest.fixture
def store(settings: WorkerSettings) -> Iterator[Store]:
    store = Store.open(settings)
    yield store
    store.close()


def orphan_upload(store: Store, settings: WorkerSettings, name: str, *, old: bool) -> str:
    """Objects of an upload whose request died before its task was recorded."""
    key = f"tasks/{name}/images/000000"
    store.objects.put_bytes(key, b"image")
    if old:
        path = Path(settings.objects_dir) / key
        os.utime(path, (OLD, OLD))
    return key


def scratch_folder(root: Path, name: str, *, old: bool) -> Path:
    folder = root / f"dmc-job-{name}"
    (folder / "state-1").mkdir(parents=True)
    (folder / "state-1" / "inference.safetensors").write_bytes(b"x" * 100)
    if old:
        for path in (folder / "state-1", folder):
            os.utime(path, (OLD, OLD))
    return folder


def totals(store: Store) -> dict[str, int]:
    return {row.kind: row.total for row in store.garbage.totals()}


def test_scratch_of_a_live_run_is_kept_however_old(tmp_path: Path) -> None:
    live = Scratch(7, tmp_path)
    os.utime(live.path, (OLD, OLD))
    dead = scratch_folder(tmp_path, "8-dead", old=True)
    young = scratch_folder(tmp_path, "9-young", old=False)
    (tmp_path / "other-old").mkdir()
    os.utime(tmp_path / "other-old", (OLD, OLD))
    assert collect_scratch(tmp_path, GRACE) == [dead]
    assert live.path.is_dir() and young.is_dir() and (tmp_path / "other-old").is_dir()
    live.remove()
    assert not live.path.exists()


def test_a_killed_runs_scratch_folder_is_not_held(tmp_path: Path) -> None:
    """The lock goes with the process: a run killed with SIGKILL leaves its folder free."""
    code = (
        "import os, signal, sys; from pathlib import Path; from worker.garbage import Scratch; "
        "s = Scratch(1, Path(sys.argv[1])); print(s.path, flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    folder = Path(done.stdout.strip())
    assert folder.is_dir() and done.returncode == -9
    os.utime(folder, (OLD, OLD))
    assert collect_scratch(tmp_path, GRACE) == [folder]


def test_the_embedded_schedule_collects_old_orphans_only(
    settings: WorkerSettings, store: Store
) -> None:
    work = Path(settings.work_dir or "")
    old_key = orphan_upload(store, settings, "a" * 32, old=True)
    young_key = orphan_upload(store, settings, "b" * 32, old=False)
    old_folder = scratch_folder(work, "1-old", old=True)
    young_folder = scratch_folder(work, "2-young", old=False)
    dispatcher = EmbeddedDispatcher(settings, store)
    dispatcher.start()
    try:
        wait_for(
            lambda: not store.objects.exists(old_key) and not old_folder.exists(),
            timeout=30,
            message="the old orphans to be collected",
        )
        # Another scheduled run later still spares the young ones.
        runs = store.garbage.totals()[0].last_run_at
        wait_for(lambda: store.garbage.totals()[0].last_run_at != runs, timeout=30)
    finally:
        dispatcher.close()
    assert store.objects.exists(young_key) and young_folder.is_dir()
    assert totals(store) == {OBJECTS: 1, SCRATCH_FOLDERS: 1}


def test_one_process_per_interval_collects_the_object_store(
    settings: WorkerSettings, store: Store
) -> None:
    """Two workers' schedules: both collect their scratch, one the shared objects."""
    ticks = [0.0]
    schedules = [GarbageSchedule(store, settings, clock=lambda: ticks[0]) for _ in range(2)]
    orphan_upload(store, settings, "c" * 32, old=True)
    reports = [s.run_if_due() for s in schedules]
    assert [len(r.objects) for r in reports if r is not None] == [1, 0]
    assert [s.run_if_due() for s in schedules] == [None, None]  # not due yet
    ticks[0] += 0.2
    assert all(s.run_if_due() is not None for s in schedules)
    assert totals(store)[OBJECTS] == 1


def test_a_zero_interval_turns_the_schedule_off(settings: WorkerSettings, store: Store) -> None:
    off = GarbageSchedule(store, settings.model_copy(update={"gc_interval_seconds": 0.0}))
    assert off.run_if_due() is None and off.seconds_to_next is None
    assert store.garbage.totals() == []
