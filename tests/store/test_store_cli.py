"""`dmc db upgrade`, `dmc db collect-garbage` and `dmc versions delete` on a SQLite file and a
local object folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from dmc_cli.main import app
from store.service import Store
from store.settings import StoreSettings


def test_upgrade_then_collect_an_orphan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMC_DATABASE_URL", f"sqlite:///{tmp_path / 'dmc.sqlite'}")
    monkeypatch.setenv("DMC_OBJECTS_DIR", str(tmp_path / "objects"))
    runner = CliRunner()
    result = runner.invoke(app, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    store = Store.open(StoreSettings())
    try:
        store.objects.put_bytes("versions/orphan/state.safetensors", b"left by a crash")
    finally:
        store.close()
    result = runner.invoke(app, ["db", "collect-garbage", "--grace-seconds", "0"])
    assert result.exit_code == 0, result.output
    assert "removed 1 unreferenced objects" in result.output
    assert not list((tmp_path / "objects").rglob("state.safetensors"))
    store = Store.open(StoreSettings())
    try:  # counted with the scheduled collections, for /metrics
        assert [(row.kind, row.total) for row in store.garbage.totals()] == [("objects", 1)]
    finally:
        store.close()


def test_versions_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMC_DATABASE_URL", f"sqlite:///{tmp_path / 'dmc.sqlite'}")
    monkeypatch.setenv("DMC_OBJECTS_DIR", str(tmp_path / "objects"))
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    store = Store.open(StoreSettings())
    try:
        files = {"manifest.json": b"{}"}
        v1 = store.registry.publish(files, parent_id=None, new_classes=["cat"], activate=True)
        v2 = store.registry.publish({"m": b"2"}, parent_id=v1.id, new_classes=["dog"])
        store.registry.publish({"m": b"3"}, parent_id=v2.id, new_classes=["owl"])
    finally:
        store.close()
    refused = runner.invoke(app, ["versions", "delete", str(v2.id)])
    assert refused.exit_code == 1 and "build on it" in refused.output
    result = runner.invoke(app, ["versions", "delete", str(v2.id), "--cascade"])
    assert result.exit_code == 0, result.output
    assert "deleted versions 2, 3" in result.output
    store = Store.open(StoreSettings())
    try:
        assert [v.id for v in store.registry.list()] == [v1.id]
    finally:
        store.close()
