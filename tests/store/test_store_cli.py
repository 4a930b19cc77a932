"""`dmc db upgrade` and `dmc db collect-garbage` on a SQLite file and a local object folder."""

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
