"""/metrics reports what the scheduled garbage collection removed (embedded mode: the
server's job thread collects)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from tests.server.conftest import Server

GRACE = 600.0


def test_metrics_count_the_collected_orphans(server_factory: Callable[..., Server]) -> None:
    server = server_factory(publish=(), gc_interval_seconds=0.2, gc_grace_seconds=GRACE)
    old = time.time() - 2 * GRACE
    for name, age in (("a" * 32, old), ("b" * 32, time.time())):
        key = f"tasks/{name}/images/000000"
        server.store.objects.put_bytes(key, b"image")
        os.utime(Path(server.settings.objects_dir) / key, (age, age))
    folder = Path(server.settings.work_dir or "") / "dmc-job-3-dead"
    folder.mkdir()
    os.utime(folder, (old, old))

    deadline = time.monotonic() + 30
    labels = ('kind="objects"', 'kind="scratch_folders"')
    while [server.metric("dmc_garbage_collected_total", label) for label in labels] != [1, 1]:
        assert time.monotonic() < deadline, server.client.get("/metrics").text
        time.sleep(0.1)
    assert server.metric("dmc_garbage_last_run_timestamp_seconds", labels[0]) > old
    assert [info.key for info in server.store.objects.list("tasks/")] == [
        f"tasks/{'b' * 32}/images/000000"
    ]
    assert not folder.exists()
