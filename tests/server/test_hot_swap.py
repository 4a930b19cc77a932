"""Hot swap: activating another version while predict requests stream in fails none of
them and switches the answers; a version whose state is corrupt is not swapped in, the old
one keeps answering, and /readyz reports the error."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.server.conftest import Server, colour_pngs

IMAGE = colour_pngs([0], 1)[0][1]


class Stream:
    """Threads that send predict requests back to back until stopped."""

    def __init__(self, server: Server, threads: int = 3) -> None:
        self.server = server
        self.results: list[list[tuple[int, int | None, int]]] = [[] for _ in range(threads)]
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            response = self.server.predict([IMAGE], top_k=10)
            body = response.json()
            version = body.get("version_id") if response.status_code == 200 else None
            classes = len(body["predictions"][0]["classes"]) if version else 0
            self.results[index].append((response.status_code, version, classes))

    def answered(self, version: int) -> int:
        return sum(1 for r in self.results for _, v, _ in r if v == version)

    def wait(self, condition: Callable[[], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def finish(self) -> list[tuple[int, int | None, int]]:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        return [r for results in self.results for r in results]


def test_activate_swaps_without_failing_a_request(server: Server) -> None:
    v2 = server.publish("v2", parent=1, activate=False)
    stream = Stream(server)
    try:
        stream.wait(lambda: stream.answered(1) >= 10)
        response = server.client.post(f"/versions/{v2.id}/activate", headers=server.headers())
        assert response.status_code == 200
        stream.wait(lambda: stream.answered(v2.id) >= 10)
    finally:
        results = stream.finish()
    assert {status for status, _, _ in results} == {200}
    for thread_results in stream.results:
        versions = [v for _, v, _ in thread_results]
        # Each client sees version 1, then version 2, never back.
        assert versions == sorted(versions), versions
    assert {(v, n) for _, v, n in results} == {(1, 2), (v2.id, 4)}
    assert server.wait_ready(version_id=v2.id)["status"] == "ready"
    assert server.metric("dmc_model_swaps_total") == 2


def test_a_swap_made_through_another_replica_is_seen(server: Server) -> None:
    v2 = server.publish("v2", parent=1, activate=False)
    server.store.registry.activate(v2.id)  # not through this server: it must poll
    server.wait_ready(version_id=v2.id)
    assert server.predict([IMAGE]).json()["version_id"] == v2.id


def test_a_corrupt_version_keeps_the_old_one_serving(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    server = server_factory(publish=("v1", "v2"))
    server.wait_ready(version_id=2)
    # Version 3: version 2's state with a manifest of its own (other bytes, so a blob of
    # its own), altered in the object store.
    state = shutil.copytree(server.states["v2"], tmp_path / "v3")
    with (state / "manifest.json").open("a") as manifest:
        manifest.write("\n")
    v3 = server.store.registry.publish(state, parent_id=2, activate=False)
    blob = Path(server.settings.objects_dir) / v3.keys["manifest.json"]
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))

    stream = Stream(server, threads=2)
    try:
        stream.wait(lambda: stream.answered(2) >= 5)
        response = server.client.post(f"/versions/{v3.id}/activate", headers=server.headers())
        assert response.status_code == 200

        def reported() -> bool:
            return server.client.get("/readyz").json()["error"] is not None

        stream.wait(reported)
        answered = stream.answered(2)
        stream.wait(lambda: stream.answered(2) >= answered + 5)
    finally:
        results = stream.finish()
    assert {(status, version) for status, version, _ in results} == {(200, 2)}
    ready = server.client.get("/readyz", headers=server.headers())  # admin: the details
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "degraded"
    assert (body["version_id"], body["active_version_id"]) == (2, v3.id)
    assert f"version {v3.id} could not be loaded" in body["error"]
    assert "altered" in body["error"]
    assert server.metric("dmc_model_loads_total", 'outcome="failure"') == 1  # not retried yet

    # A pinned request for the corrupt version says why it cannot be served.
    pinned = server.predict([IMAGE], version=v3.id)
    assert pinned.status_code == 409
    assert "cannot be loaded" in pinned.json()["detail"]

    # Rolling back to a good version clears the error.
    server.client.post("/versions/2/activate", headers=server.headers())
    server.wait_ready(version_id=2)
    deadline = time.monotonic() + 10
    while server.client.get("/readyz").json()["error"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.client.get("/readyz").json()["status"] == "ready"
