"""Settings and the `Store` built from them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from store.objects import LocalObjectStore, S3ObjectStore
from store.service import Store
from store.settings import StoreSettings
from store.uploads import UploadedImage


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DMC_DATABASE_URL", "sqlite:///x.sqlite")
    monkeypatch.setenv("DMC_OBJECT_STORE", "s3")
    monkeypatch.setenv("DMC_S3_BUCKET", "models")
    monkeypatch.setenv("DMC_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("DMC_S3_SECRET_ACCESS_KEY", "hush")
    monkeypatch.setenv("DMC_KEEP_UPLOADS", "true")
    monkeypatch.setenv("DMC_GC_GRACE_SECONDS", "60")
    settings = StoreSettings()
    assert settings.database_url == "sqlite:///x.sqlite"
    assert settings.object_store == "s3"
    assert settings.s3_bucket == "models"
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.keep_uploads is True
    assert settings.gc_grace_seconds == 60
    assert "hush" not in repr(settings)


def test_s3_needs_a_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DMC_S3_BUCKET", raising=False)
    with pytest.raises(ValidationError, match="DMC_S3_BUCKET"):
        StoreSettings(object_store="s3")


def test_embedded_store_end_to_end(tmp_path: Path) -> None:
    settings = StoreSettings(
        database_url=f"sqlite:///{tmp_path / 'data' / 'dmc.sqlite'}",
        objects_dir=tmp_path / "data" / "objects",
        gc_grace_seconds=0,
    )
    store = Store.open(settings, upgrade=True)
    try:
        assert isinstance(store.objects, LocalObjectStore)
        location = store.uploads.save([UploadedImage("cat", "a.jpg", b"img")])
        submission = store.jobs.submit(
            class_names=["cat"], image_counts=[1], uploads_location=location
        )
        store.jobs.start(submission.job.id)
        version = store.registry.publish(
            {"manifest.json": b"{}", "state.safetensors": b"t"},
            parent_id=None,
            new_classes=["cat"],
            task_id=submission.task.id,
            activate=True,
        )
        store.jobs.succeed(submission.job.id, version.id)
        assert store.uploads.release(submission.task.id)
        assert store.collect_garbage() == []
        active = store.registry.active()
        assert active is not None and active.id == version.id
    finally:
        store.close()


def test_store_on_s3(s3_settings: StoreSettings, tmp_path: Path) -> None:
    bucket = s3_settings.s3_bucket
    settings = s3_settings.model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'dmc.sqlite'}", "s3_prefix": "env-a"}
    )
    store = Store.open(settings, upgrade=True)
    try:
        assert isinstance(store.objects, S3ObjectStore)
        store.objects.ensure_bucket()
        version = store.registry.publish({"state.safetensors": b"w"}, parent_id=None)
        assert {i.key for i in store.objects.list()} == {version.keys["state.safetensors"]}
        raw = store.objects.client.list_objects_v2(Bucket=bucket)
        assert all(item["Key"].startswith("env-a/blobs/") for item in raw["Contents"])
        path = store.registry.load_state(version.id, tmp_path / "state")
        assert (path / "state.safetensors").read_bytes() == b"w"
    finally:
        store.close()
