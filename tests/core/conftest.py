from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dmc_core.backbone import Backbone, BackboneSpec, load_backbone, save_checkpoint
from tests.core.toy import FAMILIES


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BackboneSpec]:
    """One randomly initialised checkpoint per model family, so every load is the same model."""
    folder = tmp_path_factory.mktemp("checkpoints")
    specs = {}
    for name in FAMILIES:
        torch.manual_seed(0)
        path = folder / f"{name}.pt"
        save_checkpoint(load_backbone(name).model, path)
        specs[name] = BackboneSpec(name, checkpoint=str(path))
    return specs


@pytest.fixture
def backbone_factory(checkpoints: dict[str, BackboneSpec]) -> Callable[[str], Backbone]:
    return lambda family: load_backbone(checkpoints[family])


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
