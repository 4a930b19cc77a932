"""docs/architecture.md names real functions: every `module:name` it cites exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
REFERENCE = re.compile(r"`((?:dmc_core|store|worker|server)(?:\.\w+)+):(\w+(?:\.\w+)*)`")


def test_every_cited_function_exists() -> None:
    cited = REFERENCE.findall(DOC.read_text())
    assert len(cited) > 20
    missing = []
    for module_name, dotted in cited:
        target: object = importlib.import_module(module_name)
        for part in dotted.split("."):
            target = getattr(target, part, None)
        if target is None:
            missing.append(f"{module_name}:{dotted}")
    assert not missing, f"docs/architecture.md cites names that do not exist: {missing}"
