"""`dmc demo`, non-interactively: the embedded service with the stand-in model, two tasks of
Fashion-MNIST classes, predictions after each, and a rollback that changes them."""

from __future__ import annotations

import ast
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_demo_walkthrough(tmp_path: Path) -> None:
    cache = Path(os.environ.get("DMC_TEST_CACHE", tmp_path / "models"))
    command = [
        sys.executable, "-m", "dmc_cli.main", "demo", "--no-keep-serving",
        "--port", str(_free_port()), "--folder", str(tmp_path / "demo"),
        "--cache-dir", str(cache), "--images-per-class", "10", "--test-per-class", "8",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMC_") or "TEST" in k}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    accuracy = [float(a) for a in re.findall(r"learned so far: ([\d.]+)%", out)]
    assert len(accuracy) == 2
    assert accuracy[0] >= 60.0  # three classes: chance is 33%
    changed, total = map(int, re.search(r"(\d+) of (\d+) answers changed", out).groups())  # type: ignore[union-attr]
    assert 0 < changed <= total
    allowed = re.search(r"v1 can only answer (\[.*\])", out)
    assert allowed is not None and set(ast.literal_eval(allowed.group(1))) <= {
        "t-shirt",
        "trouser",
        "bag",
    }
    assert "/admin" in out and "job 2 succeeded" in out
    # Extend and remove build on the rolled-back version; the removed class is never answered.
    assert "version v3 builds on v1" in out
    known = re.search(r"version v4 knows (\[.*\])", out)
    assert known is not None and ast.literal_eval(known.group(1)) == ["t-shirt", "trouser"]
    answered = re.search(r"now predicted as (\[.*\])", out)
    assert answered is not None and "bag" not in ast.literal_eval(answered.group(1))
