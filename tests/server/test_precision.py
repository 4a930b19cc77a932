"""Issue 19 (2): the server runs versions in DMC_PRECISION, not in the precision their
manifest was saved with (only the worker used to apply the setting)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from dmc_core.state_files import MANIFEST
from server.app import _default_loader
from server.settings import ServerSettings
from store.service import Store


@pytest.mark.parametrize(("saved", "setting"), [("fp32", "bf16"), ("bf16", "fp32")])
def test_the_server_loads_versions_in_the_configured_precision(
    saved: str,
    setting: str,
    settings_factory: Callable[..., ServerSettings],
    states: dict[str, Path],
    tmp_path: Path,
) -> None:
    state = Path(shutil.copytree(states["v1"], tmp_path / "state"))
    manifest = json.loads((state / MANIFEST).read_text())
    manifest["config"]["precision"] = saved
    (state / MANIFEST).write_text(json.dumps(manifest))

    settings = settings_factory(precision=setting)
    store = Store.open(settings)
    try:
        version = store.registry.publish(
            state, parent_id=None, new_classes=["red", "green"], activate=True
        )
        model = _default_loader(store, settings)(version.id)
    finally:
        store.close()
    assert model.learner.config.precision == setting
    assert len(model.rank(model.preprocess([Image.new("RGB", (32, 32))]), [2])[0].names) == 2
