"""Issue 14 (5): versions pinned by requests load one at a time, and the versions kept
for pinned requests are bounded in bytes: a request that cannot start its load in time
gets 503 with Retry-After instead of loading every version at once."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from server.model import LoadedModel, Loader, store_loader
from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import Server
from tests.server.test_predict import jpeg


class SlowLoads:
    """The store loader, taking at least `seconds` a load; counts loads running at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def factory(self, store: Store, settings: ServerSettings) -> Loader:
        load = store_loader(store.registry, device="cpu", cache_dir=settings.model_cache_dir)

        def slow(version_id: int) -> LoadedModel:
            with self.lock:
                self.running += 1
                self.most = max(self.most, self.running)
            try:
                time.sleep(self.seconds)
                return load(version_id)
            finally:
                with self.lock:
                    self.running -= 1

        return slow


def copies_of_v2(server: Server, tmp_path: Path, count: int) -> list[int]:
    """Versions with version 2's classes (its state, each manifest with other bytes)."""
    ids = []
    for i in range(count):
        state = shutil.copytree(server.states["v2"], tmp_path / f"copy{i}")
        with (state / "manifest.json").open("a") as manifest:
            manifest.write("\n" * (i + 1))
        ids.append(server.store.registry.publish(state, parent_id=2, activate=False).id)
    return ids


def test_pinned_versions_load_one_at_a_time_and_the_rest_get_503(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    loads = SlowLoads(1.5)
    server = server_factory(
        publish=("v1", "v2"),
        create_app_kwargs={"loader_factory": loads.factory},
        version_loads_at_once=1,
        version_load_wait_seconds=0.3,
    )
    server.wait_ready(version_id=2)
    pinned = [1, *copies_of_v2(server, tmp_path, 3)]
    with ThreadPoolExecutor(len(pinned)) as pool:
        responses = list(pool.map(lambda v: server.predict([jpeg()], version=v), pinned))
    statuses = sorted(r.status_code for r in responses)
    assert loads.most == 1
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            assert "DMC_VERSION_LOADS_AT_ONCE" in response.json()["detail"]
    # Once the load is done, the next pinned request is served.
    busy = next(v for v, r in zip(pinned, responses, strict=True) if r.status_code == 503)
    deadline = time.monotonic() + 30
    while (answer := server.predict([jpeg()], version=busy)).status_code == 503:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert answer.status_code == 200 and answer.json()["version_id"] == busy


def test_the_versions_kept_for_pinned_requests_are_bounded_in_bytes(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    server = server_factory(publish=("v1", "v2"), pinned_versions_cached=5)
    server.wait_ready(version_id=2)
    holder = server.client.app.state.services.holder  # type: ignore[attr-defined]
    one = holder.current.nbytes
    assert one > 0
    holder.cache_bytes = int(one * 2.5)  # room for two loaded versions
    pinned = [1, *copies_of_v2(server, tmp_path, 3)]
    for version in pinned:
        assert server.predict([jpeg()], version=version).status_code == 200
    assert holder.cached_versions == pinned[-2:]
    assert holder.cached_bytes() <= holder.cache_bytes
