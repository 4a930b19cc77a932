"""Settings every test run shares: no model hub, small thread pools on the 2-core machines."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_dmc_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings in the tests come from the tests, not from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("DMC_") and not name.startswith("DMC_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file; tests copy it instead of migrating their own."""
    from store.db import upgrade_database  # here: the core tests need no store

    path = tmp_path_factory.mktemp("sqlite-template") / "dmc.sqlite"
    upgrade_database(f"sqlite:///{path}")
    return path
