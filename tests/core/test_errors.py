"""Every error dmc_core raises on purpose derives from `DmcError` and keeps its builtin base."""

from __future__ import annotations

import pytest

from dmc_core.adapters import AdapterError
from dmc_core.backbone import BackboneError, load_backbone
from dmc_core.data.registry import DatasetError, get_dataset
from dmc_core.errors import DmcError
from dmc_core.experiment.config import ExperimentError
from dmc_core.learner import TaskError
from dmc_core.standin import StandinError
from dmc_core.state import StateError


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (AdapterError, ValueError),
        (BackboneError, RuntimeError),
        (DatasetError, ValueError),
        (ExperimentError, ValueError),
        (StandinError, RuntimeError),
        (StateError, ValueError),
        (TaskError, ValueError),
    ],
)
def test_errors_share_one_base(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, DmcError)
    assert issubclass(error, builtin)


def test_raised_errors_are_caught_as_dmc_errors() -> None:
    with pytest.raises(DmcError, match="unknown dataset"):
        get_dataset("no-such-dataset")
    with pytest.raises(DmcError, match="precision"):
        load_backbone("dmc-tiny-vit", precision="fp64")
