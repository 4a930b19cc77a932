"""The version registry, on SQLite and PostgreSQL, with a local folder and with S3."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import SessionTransaction

from store.db import Database
from store.errors import (
    ClassNotFoundError,
    DuplicateClassError,
    StaleParentError,
    StateIntegrityError,
    TaskNotFoundError,
    VersionInUseError,
    VersionNotFoundError,
)
from store.lineage import ClassChange
from store.models import TaskKind, Version
from store.objects import ObjectStore, sha256_bytes, state_checksum
from store.registry import Registry, VersionInfo


@pytest.fixture
def registry(db: Database, objects: ObjectStore) -> Registry:
    return Registry(db, objects, gc_grace_seconds=0)


def state_files(tag: str) -> dict[str, bytes]:
    """What a learner state looks like on disk: a manifest and a tensor file."""
    return {
        "manifest.json": f'{{"tag": "{tag}"}}'.encode(),
        "state.safetensors": tag.encode() * 1000,
    }


def write_state(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    for name, data in state_files(tag).items():
        (folder / name).write_bytes(data)
    return folder


def loaded(registry: Registry, version_id: int, dest: Path) -> dict[str, bytes]:
    path = registry.load_state(version_id, dest)
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def blob_keys(objects: ObjectStore) -> set[str]:
    return {info.key for info in objects.list()}


def version_keys(registry: Registry) -> set[str]:
    return {key for v in registry.list() for key in v.keys.values()}


def snapshot(registry: Registry) -> tuple[list[VersionInfo], VersionInfo | None, set[str]]:
    return registry.list(), registry.active(), blob_keys(registry.objects)


class SimulatedCrash(BaseException):
    """Stands for the process dying: no `except Exception` clean-up runs."""


# --- publishing and reading --------------------------------------------------------


def test_publish_folder_and_load_it_back(registry: Registry, tmp_path: Path) -> None:
    folder = write_state(tmp_path / "state", "v1")
    v1 = registry.publish(
        folder, parent_id=None, metrics={"accuracy": 0.9}, new_classes=["cat", "dog"]
    )
    assert v1.parent_id is None
    assert v1.class_count == 2
    assert v1.metrics == {"accuracy": 0.9}
    assert v1.new_classes == ("cat", "dog")
    assert set(v1.files) == {"manifest.json", "state.safetensors"}
    assert v1.state_location.startswith("versions/")
    assert v1.created_at.tzinfo is not None
    assert registry.get(v1.id) == v1
    assert registry.active() is None  # publishing does not activate unless asked

    assert loaded(registry, v1.id, tmp_path / "out") == state_files("v1")


def test_lineage_listing_and_class_names(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat", "dog"])
    v2 = registry.publish(state_files("2"), parent_id=v1.id, new_classes=["owl"], activate=True)
    v3 = registry.publish(state_files("3"), parent_id=v2.id, new_classes=["ant", "bee"])
    assert (v2.parent_id, v3.parent_id) == (v1.id, v2.id)
    assert [v.class_count for v in (v1, v2, v3)] == [2, 3, 5]
    assert [v.id for v in registry.list()] == [v3.id, v2.id, v1.id]
    assert [v.id for v in registry.list(limit=1, offset=1)] == [v2.id]
    assert registry.newest() == v3
    active = registry.active()
    assert active is not None and active.id == v2.id
    assert registry.class_names(v3.id) == ["cat", "dog", "owl", "ant", "bee"]
    assert registry.class_names(v2.id) == ["cat", "dog", "owl"]
    assert loaded(registry, v2.id, tmp_path / "v2") == state_files("2")


def test_load_state_into_fresh_temporary_folder(registry: Registry) -> None:
    v1 = registry.publish(state_files("t"), parent_id=None)
    path = registry.load_state(v1.id)
    assert (path / "manifest.json").read_bytes() == state_files("t")["manifest.json"]


def test_load_state_refuses_a_non_empty_destination(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.publish(state_files("t"), parent_id=None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(FileExistsError):
        registry.load_state(v1.id, tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    assert registry.load_state(v1.id, tmp_path / "empty") == tmp_path / "empty"


def test_publish_rejects_bad_input_and_changes_nothing(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat"], activate=True)
    before = snapshot(registry)
    with pytest.raises(VersionNotFoundError, match="999"):
        registry.publish(state_files("x"), parent_id=999)
    with pytest.raises(DuplicateClassError, match="cat"):
        registry.publish(state_files("x"), parent_id=v1.id, new_classes=["cow", "cat"])
    with pytest.raises(TaskNotFoundError):
        registry.publish(state_files("x"), parent_id=v1.id, new_classes=["cow"], task_id=77)
    with pytest.raises(ValueError, match="more than once"):
        registry.publish(state_files("x"), parent_id=v1.id, new_classes=["cow", "cow"])
    with pytest.raises(ValueError, match="no files"):
        registry.publish({}, parent_id=v1.id)
    with pytest.raises(NotADirectoryError):
        registry.publish(tmp_path / "missing", parent_id=v1.id)
    assert snapshot(registry) == before


def test_require_newest_parent(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None)
    v2 = registry.publish(state_files("2"), parent_id=v1.id, require_newest_parent=True)
    before = snapshot(registry)
    with pytest.raises(StaleParentError) as caught:
        registry.publish(state_files("3"), parent_id=v1.id, require_newest_parent=True)
    assert caught.value.newest_id == v2.id
    assert snapshot(registry) == before


def test_version_ids_are_not_reused_after_delete(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, activate=True)
    v2 = registry.publish(state_files("2"), parent_id=v1.id)
    registry.delete(v2.id)
    v3 = registry.publish(state_files("3"), parent_id=v1.id)
    assert v3.id > v2.id


# --- must hold: two publishers at the same moment -----------------------------------


def test_two_publishers_at_the_same_moment(registry: Registry, tmp_path: Path) -> None:
    base = registry.publish(state_files("base"), parent_id=None, new_classes=["a"], activate=True)
    barrier = threading.Barrier(2)
    results: dict[str, VersionInfo] = {}
    errors: list[BaseException] = []

    def publisher(tag: str) -> None:
        try:
            barrier.wait(timeout=10)
            results[tag] = registry.publish(
                state_files(tag),
                parent_id=base.id,
                new_classes=[f"class-{tag}"],
                metrics={"tag": tag},
                activate=True,
            )
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=publisher, args=(tag,)) for tag in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []

    left, right = results["left"], results["right"]
    assert left.id != right.id
    assert left.state_location != right.state_location
    assert left.parent_id == right.parent_id == base.id
    versions = {v.id: v for v in registry.list()}
    assert set(versions) == {base.id, left.id, right.id}
    for tag, info in results.items():
        assert versions[info.id].metrics == {"tag": tag}
        assert versions[info.id].class_count == 2
        assert registry.class_names(info.id) == ["a", f"class-{tag}"]
        assert loaded(registry, info.id, tmp_path / tag) == state_files(tag)
    assert loaded(registry, base.id, tmp_path / "base") == state_files("base")
    active = registry.active()
    assert active is not None and active.id in (left.id, right.id)
    assert registry.collect_garbage() == []


def test_two_publishers_racing_on_the_newest_parent(registry: Registry) -> None:
    base = registry.publish(state_files("base"), parent_id=None)
    barrier = threading.Barrier(2)
    outcomes: list[VersionInfo | BaseException] = []

    def publisher(tag: str) -> None:
        barrier.wait(timeout=10)
        try:
            outcomes.append(
                registry.publish(state_files(tag), parent_id=base.id, require_newest_parent=True)
            )
        except BaseException as error:
            outcomes.append(error)

    threads = [threading.Thread(target=publisher, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    published = [o for o in outcomes if isinstance(o, VersionInfo)]
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(published) == 1 and len(refused) == 1
    assert isinstance(refused[0], StaleParentError)
    assert [v.id for v in registry.list()] == [published[0].id, base.id]
    # The refused publisher cleaned its blobs up.
    assert blob_keys(registry.objects) == version_keys(registry)


# --- must hold: a crash between the blobs and the row -------------------------------


def test_crash_between_blobs_and_commit(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat"], activate=True)
    before = snapshot(registry)

    def crash(self: SessionTransaction, *args: object, **kwargs: object) -> None:
        raise SimulatedCrash("power cut before COMMIT")

    monkeypatch.setattr(SessionTransaction, "commit", crash)
    with pytest.raises(SimulatedCrash):
        registry.publish(state_files("2"), parent_id=v1.id, new_classes=["dog"], activate=True)
    monkeypatch.undo()

    versions, active, keys = snapshot(registry)
    assert versions == before[0]
    assert active == before[1] and active is not None and active.id == v1.id
    orphans = keys - before[2]
    assert len(orphans) == 2  # the blobs were written, the row never committed
    assert registry.class_names(v1.id) == ["cat"]

    assert sorted(registry.collect_garbage()) == sorted(orphans)
    assert blob_keys(registry.objects) == before[2]
    assert loaded(registry, v1.id, tmp_path / "v1") == state_files("1")
    # "dog" was never recorded, so it can still be introduced.
    registry.publish(state_files("2"), parent_id=v1.id, new_classes=["dog"])


def test_failed_row_insert_leaves_nothing(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, activate=True)
    before = snapshot(registry)

    def broken_insert(*args: object, **kwargs: object) -> VersionInfo:
        raise RuntimeError("insert failed")

    monkeypatch.setattr(Registry, "_insert", broken_insert)
    with pytest.raises(RuntimeError, match="insert failed"):
        registry.publish(state_files("2"), parent_id=v1.id, activate=True)
    monkeypatch.undo()
    assert snapshot(registry) == before  # the blobs were removed right away


def test_garbage_collector_spares_recent_blobs(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None)
    registry.objects.put_bytes("versions/in-progress/state.safetensors", b"being published")
    assert registry.collect_garbage(grace_seconds=3600) == []
    assert registry.collect_garbage(grace_seconds=0) == ["versions/in-progress/state.safetensors"]
    assert blob_keys(registry.objects) == set(v1.keys.values())


# --- must hold: an altered blob is refused -----------------------------------------


def test_altered_blob_is_refused_on_load(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, activate=True)
    registry.objects.put_bytes(v1.keys["state.safetensors"], b"evil weights")
    loads = tmp_path / "loads"
    with pytest.raises(StateIntegrityError, match=r"'state.safetensors' was altered") as caught:
        registry.load_state(v1.id, loads / "out")
    assert caught.value.version_id == v1.id
    assert list(loads.iterdir()) == []  # neither the destination nor a staging folder


def test_missing_blob_is_refused_on_load(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None)
    registry.objects.delete(v1.keys["manifest.json"])
    with pytest.raises(StateIntegrityError, match=r"'manifest.json' is missing"):
        registry.load_state(v1.id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_altered_file_list_is_refused_on_load(
    registry: Registry, db: Database, tmp_path: Path
) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None)
    files = {
        name: {"sha256": "0" * 64 if name == "manifest.json" else digest, "size": 1}
        for name, digest in v1.files.items()
    }
    with db.write() as session:
        session.execute(update(Version).where(Version.id == v1.id).values(files=files))
    with pytest.raises(StateIntegrityError, match="checksum"):
        registry.load_state(v1.id, tmp_path / "out")


# --- must hold: unknown versions ------------------------------------------------------


def test_activating_or_deleting_an_unknown_version(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, activate=True)
    registry.publish(state_files("2"), parent_id=v1.id)
    before = snapshot(registry)
    with pytest.raises(VersionNotFoundError, match="model version 12345 does not exist"):
        registry.activate(12345)
    assert snapshot(registry) == before
    with pytest.raises(VersionNotFoundError, match="model version 12345 does not exist"):
        registry.delete(12345)
    assert snapshot(registry) == before
    with pytest.raises(VersionNotFoundError):
        registry.get(12345)
    with pytest.raises(VersionNotFoundError):
        registry.load_state(12345)
    with pytest.raises(VersionNotFoundError):
        registry.class_names(12345)


# --- activate (rollback) and delete ---------------------------------------------------


def test_activate_moves_the_alias_and_rolls_back(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, activate=True)
    v2 = registry.publish(state_files("2"), parent_id=v1.id, activate=True)
    assert registry.active() == v2
    assert registry.activate(v1.id) == v1
    assert registry.active() == v1
    registry.activate(v2.id)
    assert registry.active() == v2


def test_delete_rules(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat"])
    v2 = registry.publish(state_files("2"), parent_id=v1.id, new_classes=["dog"], activate=True)
    v3 = registry.publish(state_files("3"), parent_id=v2.id, new_classes=["owl"])
    before = snapshot(registry)
    with pytest.raises(VersionInUseError, match="active version"):
        registry.delete(v2.id)
    with pytest.raises(VersionInUseError, match=f"versions {v2.id} build on it"):
        registry.delete(v1.id)
    assert snapshot(registry) == before

    registry.delete(v3.id)
    assert [v.id for v in registry.list()] == [v2.id, v1.id]
    assert blob_keys(registry.objects) == version_keys(registry)
    assert not set(v3.keys.values()) & blob_keys(registry.objects)
    # The deleted version's classes are free again.
    v4 = registry.publish(state_files("4"), parent_id=v2.id, new_classes=["owl"])
    assert registry.class_names(v4.id) == ["cat", "dog", "owl"]
    assert registry.collect_garbage() == []


# --- content addressing: versions share the blobs that did not change -----------------


def test_versions_share_unchanged_blobs(registry: Registry, tmp_path: Path) -> None:
    task0, task1 = b"statistics of task 0" * 100, b"statistics of task 1" * 100
    v1 = registry.publish(
        {"manifest.json": b"m1", "memory/task-0": task0}, parent_id=None, activate=True
    )
    assert (v1.added_bytes, v1.size_bytes) == (2 + len(task0), 2 + len(task0))
    state2 = {"manifest.json": b"m2", "memory/task-0": task0, "memory/task-1": task1}
    v2 = registry.publish(state2, parent_id=v1.id)
    assert v2.size_bytes == 2 + len(task0) + len(task1)
    assert v2.added_bytes == 2 + len(task1)  # task 0's statistics are stored once
    assert v2.keys["memory/task-0"] == v1.keys["memory/task-0"]
    assert registry.get(v2.id) == v2
    assert len(blob_keys(registry.objects)) == 4
    out = registry.load_state(v2.id, tmp_path / "v2-again")
    assert (out / "memory" / "task-0").read_bytes() == task0
    assert (out / "memory" / "task-1").read_bytes() == task1

    # The same state again adds nothing.
    v3 = registry.publish(state2, parent_id=v2.id)
    assert v3.added_bytes == 0 and v3.size_bytes == v2.size_bytes

    # Deleting a version removes only the blobs no other version references.
    registry.delete(v3.id)
    registry.delete(v2.id)
    assert blob_keys(registry.objects) == set(v1.keys.values())
    assert registry.collect_garbage() == []
    assert (registry.load_state(v1.id, tmp_path / "v1") / "memory" / "task-0").read_bytes() == task0


def test_garbage_collector_keeps_shared_blobs_and_spares_recent_ones(registry: Registry) -> None:
    shared = b"shared" * 50
    v1 = registry.publish({"a": shared, "b": b"only v1"}, parent_id=None, activate=True)
    v2 = registry.publish({"a": shared, "b": b"only v2"}, parent_id=None)
    orphan = "blobs/" + "0" * 64  # as a crash between the upload and the commit leaves it
    registry.objects.put_bytes(orphan, b"orphan")
    assert registry.collect_garbage(grace_seconds=3600) == []
    assert registry.collect_garbage(grace_seconds=0) == [orphan]
    # A blob goes only once no version references it.
    registry.activate(v2.id)
    registry.delete(v1.id)
    assert blob_keys(registry.objects) == set(v2.keys.values())
    assert registry.collect_garbage() == []


def test_a_reused_blob_collected_before_the_commit_is_stored_again(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Left by a deleted version: present when the publisher looks, gone (collected)
    # before its transaction; the publisher notices under the lock and uploads it again.
    key = "blobs/" + sha256_bytes(b"reused")
    registry.objects.put_bytes(key, b"reused")
    objects = registry.objects
    real_exists = objects.exists
    collected: list[str] = []

    def exists_then_collected(k: str) -> bool:
        found = real_exists(k)
        if found and not collected:
            collected.extend(registry.collect_garbage(grace_seconds=0))
        return found

    monkeypatch.setattr(objects, "exists", exists_then_collected)
    v1 = registry.publish({"memory": b"reused", "manifest.json": b"m"}, parent_id=None)
    assert key in collected
    assert v1.added_bytes == len(b"reused") + 1
    assert loaded(registry, v1.id, tmp_path / "v1") == {"manifest.json": b"m", "memory": b"reused"}


def test_inference_part_fetches_only_inference_files(registry: Registry, tmp_path: Path) -> None:
    memory = b"gaussian statistics" * 1000
    manifest = {
        "format_version": 2,
        "files": {
            "inference.safetensors": {"part": "inference"},
            "memory/task-00000.safetensors": {"part": "training"},
        },
    }
    state = {
        "manifest.json": json.dumps(manifest).encode(),
        "inference.safetensors": b"adapter and prototypes",
        "memory/task-00000.safetensors": memory,
    }
    v1 = registry.publish(state, parent_id=None)
    registry.objects.delete(v1.keys["memory/task-00000.safetensors"])
    out = registry.load_state(v1.id, tmp_path / "replica", part="inference")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "inference.safetensors",
        "manifest.json",
    ]
    with pytest.raises(StateIntegrityError, match="is missing"):
        registry.load_state(v1.id, tmp_path / "worker", part="full")


def test_versions_stored_before_content_addressing_still_work(
    registry: Registry, db: Database, tmp_path: Path
) -> None:
    # What the previous publish wrote: files under the version's own prefix, no keys.
    files = state_files("old")
    location = "versions/0123abcd/"
    for name, data in files.items():
        registry.objects.put_bytes(location + name, data)
    digests = {n: sha256_bytes(d) for n, d in files.items()}
    entries = {n: {"sha256": digests[n], "size": len(d)} for n, d in files.items()}
    with db.write() as session:
        row = Version(
            parent_id=None,
            class_count=0,
            metrics={},
            state_location=location,
            checksum=state_checksum(digests),
            files=entries,
        )
        session.add(row)
        session.flush()
        old_id = row.id
    old = registry.get(old_id)
    assert old.added_bytes == old.size_bytes == sum(len(d) for d in files.values())
    assert registry.collect_garbage() == []
    assert loaded(registry, old_id, tmp_path / "old") == files

    # A new version with the same manifest bytes stores them once, under blobs/.
    new = registry.publish(files, parent_id=None, activate=True)
    assert new.added_bytes == new.size_bytes  # nothing of it was content-addressed before
    assert all(key.startswith("blobs/") for key in new.keys.values())
    assert registry.collect_garbage() == []
    registry.delete(old_id)
    assert blob_keys(registry.objects) == set(new.keys.values())


# --- class lifecycle: versions form a tree; names are unique within a lineage ------------


def test_changes_build_each_versions_class_list(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat", "dog"])
    extended = ClassChange(TaskKind.EXTEND, ("dog",))
    v2 = registry.publish(state_files("2"), parent_id=v1.id, change=extended, task_id=None)
    renamed = ClassChange(TaskKind.RENAME, ("cat",), {"cat": "kitten"})
    v3 = registry.publish(state_files("3"), parent_id=v2.id, change=renamed)
    v4 = registry.publish(
        state_files("4"), parent_id=v3.id, change=ClassChange(TaskKind.REMOVE, ("dog",))
    )
    assert registry.class_names(v2.id) == ["cat", "dog"]
    assert registry.class_names(v3.id) == ["kitten", "dog"]
    assert registry.class_names(v4.id) == ["kitten"]
    # A renamed class keeps the version that first learned it.
    assert [(c.name, c.version_id) for c in registry.classes(v4.id)] == [("kitten", v1.id)]
    assert registry.get(v3.id).change == {
        "kind": "rename",
        "classes": ["cat"],
        "renamed": {"cat": "kitten"},
    }
    assert (v4.class_count, v4.new_classes) == (1, ())
    # A removed name may come back; on another branch a name is free too.
    v5 = registry.publish(state_files("5"), parent_id=v4.id, new_classes=["dog"])
    v6 = registry.publish(state_files("6"), parent_id=v1.id, new_classes=["owl"])
    other = registry.publish(state_files("7"), parent_id=v5.id, new_classes=["owl"])
    assert registry.class_names(other.id) == ["kitten", "dog", "owl"]
    assert registry.class_names(v6.id) == ["cat", "dog", "owl"]
    with pytest.raises(DuplicateClassError):
        registry.publish(state_files("8"), parent_id=v6.id, new_classes=["owl"])
    with pytest.raises(ClassNotFoundError):
        registry.publish(
            state_files("9"), parent_id=v6.id, change=ClassChange(TaskKind.REMOVE, ("kitten",))
        )


def test_delete_with_cascade_removes_the_subtree(registry: Registry) -> None:
    v1 = registry.publish(state_files("1"), parent_id=None, new_classes=["cat"], activate=True)
    v2 = registry.publish(state_files("2"), parent_id=v1.id, new_classes=["dog"])
    v3 = registry.publish(state_files("3"), parent_id=v2.id, new_classes=["owl"])
    v4 = registry.publish(state_files("4"), parent_id=v1.id, new_classes=["emu"])
    with pytest.raises(VersionInUseError, match="cascade"):
        registry.delete(v2.id)
    registry.activate(v3.id)
    with pytest.raises(VersionInUseError, match=f"version {v3.id} .* active"):
        registry.delete(v2.id, cascade=True)
    registry.activate(v4.id)
    assert registry.delete(v2.id, cascade=True) == [v2.id, v3.id]
    assert [v.id for v in registry.list()] == [v4.id, v1.id]
    assert blob_keys(registry.objects) == version_keys(registry)
