"""The object store interface: the local folder and S3 (moto over HTTP) pass the same tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from store.errors import ObjectIntegrityError, ObjectNotFoundError
from store.objects import LocalObjectStore, ObjectStore, sha256_bytes, state_checksum


def test_put_get_roundtrip_returns_sha256(objects: ObjectStore) -> None:
    digest = objects.put_bytes("a/b/blob.bin", b"hello")
    assert digest == sha256_bytes(b"hello")
    assert objects.get_bytes("a/b/blob.bin") == b"hello"
    assert objects.get_bytes("a/b/blob.bin", sha256=digest) == b"hello"
    assert objects.exists("a/b/blob.bin")
    assert not objects.exists("a/b/other.bin")


def test_put_replaces_existing_object(objects: ObjectStore) -> None:
    objects.put_bytes("k", b"one")
    objects.put_bytes("k", b"two")
    assert objects.get_bytes("k") == b"two"


def test_altered_content_is_refused(objects: ObjectStore) -> None:
    digest = objects.put_bytes("x/blob", b"original")
    objects.put_bytes("x/blob", b"tampered")
    with pytest.raises(ObjectIntegrityError, match="corrupt") as caught:
        objects.get_bytes("x/blob", sha256=digest)
    assert caught.value.expected == digest
    assert caught.value.actual == sha256_bytes(b"tampered")


def test_get_file_verifies_and_leaves_nothing_on_mismatch(
    objects: ObjectStore, tmp_path: Path
) -> None:
    digest = objects.put_bytes("f/data", b"payload")
    dest = tmp_path / "out" / "data"
    assert objects.get_file("f/data", dest, sha256=digest) == digest
    assert dest.read_bytes() == b"payload"

    bad = tmp_path / "bad" / "data"
    with pytest.raises(ObjectIntegrityError):
        objects.get_file("f/data", bad, sha256="0" * 64)
    assert not bad.exists()
    assert list(bad.parent.iterdir()) == []


def test_put_file_large_streams(objects: ObjectStore, tmp_path: Path) -> None:
    # Bigger than boto3's multipart threshold (8 MiB).
    data = os.urandom(9 * 1024 * 1024)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    digest = objects.put_file("big/state.bin", source)
    assert digest == sha256_bytes(data)
    dest = tmp_path / "back.bin"
    objects.get_file("big/state.bin", dest, sha256=digest)
    assert dest.read_bytes() == data


def test_missing_object(objects: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError):
        objects.get_bytes("nope/blob")
    with pytest.raises(ObjectNotFoundError):
        objects.get_file("nope/blob", tmp_path / "blob")
    assert not (tmp_path / "blob").exists()
    objects.delete("nope/blob")  # deleting what is not there is fine


def test_list_and_delete_prefix(objects: ObjectStore) -> None:
    for key in ("versions/a/1", "versions/a/2", "versions/b/1", "tasks/a/1", "versionsx/1"):
        objects.put_bytes(key, key.encode())
    listed = {info.key: info for info in objects.list("versions/")}
    assert set(listed) == {"versions/a/1", "versions/a/2", "versions/b/1"}
    assert listed["versions/a/1"].size == len(b"versions/a/1")
    assert listed["versions/a/1"].modified.tzinfo is not None
    assert {i.key for i in objects.list("versions/a")} == {"versions/a/1", "versions/a/2"}
    assert len(list(objects.list())) == 5

    assert objects.delete_prefix("versions/a/") == 2
    assert {i.key for i in objects.list("versions/")} == {"versions/b/1"}
    objects.delete("versions/b/1")
    assert list(objects.list("versions/")) == []
    assert objects.get_bytes("tasks/a/1") == b"tasks/a/1"


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/"])
def test_invalid_keys_are_rejected(objects: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        objects.put_bytes(key, b"x")


def test_state_checksum_depends_on_names_and_digests() -> None:
    a = state_checksum({"manifest.json": "1" * 64, "state.safetensors": "2" * 64})
    assert a == state_checksum({"state.safetensors": "2" * 64, "manifest.json": "1" * 64})
    assert a != state_checksum({"manifest.json": "2" * 64, "state.safetensors": "1" * 64})
    assert a != state_checksum({"manifest.json": "1" * 64})


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("v/blob", b"old")

    def fail_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk gone"):
        store.put_bytes("v/blob", b"new")
    monkeypatch.undo()
    assert store.get_bytes("v/blob") == b"old"
    assert sorted(p.name for p in (tmp_path / "objects" / "v").iterdir()) == ["blob"]


def test_local_delete_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("versions/abc/sub/blob", b"x")
    store.delete("versions/abc/sub/blob")
    assert not (tmp_path / "objects" / "versions" / "abc").exists()
    assert (tmp_path / "objects" / "versions").is_dir()
