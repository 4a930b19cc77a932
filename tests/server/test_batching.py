"""The micro-batcher: concurrent requests share forward passes; a full queue is 503."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from server.app import _default_loader
from server.model import LoadedModel, Loader
from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import Server, colour_pngs

IMAGES = [data for _, data in colour_pngs([0, 1], 4)]


def test_concurrent_requests_share_forward_passes(server_factory: Callable[..., Server]) -> None:
    server = server_factory(batch_max_wait_ms=100.0, batch_max_size=32)
    server.wait_ready()
    requests = 16
    with ThreadPoolExecutor(requests) as pool:
        responses = list(pool.map(lambda i: server.predict([IMAGES[i % len(IMAGES)]]), range(16)))
    assert [r.status_code for r in responses] == [200] * requests
    batches = server.metric("dmc_predict_batch_size_count")
    assert server.metric("dmc_predict_batch_size_sum") == requests
    assert batches < requests / 2, batches
    # Each answer is its own image's: the same as when it is sent alone.
    alone = server.predict([IMAGES[5]]).json()["predictions"][0]["classes"]
    batched = responses[5].json()["predictions"][0]["classes"]
    assert [c["name"] for c in alone] == [c["name"] for c in batched]
    for a, b in zip(alone, batched, strict=True):
        assert abs(a["probability"] - b["probability"]) < 1e-4


def test_a_request_over_max_batch_is_split(server_factory: Callable[..., Server]) -> None:
    server = server_factory(batch_max_size=3)
    server.wait_ready()
    response = server.predict(IMAGES[:7])
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 7
    assert server.metric("dmc_predict_batch_size_count") == 3


def test_a_full_queue_is_503_with_retry_after(server_factory: Callable[..., Server]) -> None:
    gate, entered = threading.Event(), threading.Event()

    def gated(store: Store, settings: ServerSettings) -> Loader:
        load = _default_loader(store, settings)

        def loader(version_id: int) -> LoadedModel:
            model = load(version_id)
            rank = model.rank

            def slow_rank(pixels, top_k):  # type: ignore[no-untyped-def]
                entered.set()
                gate.wait(30)
                return rank(pixels, top_k)

            model.rank = slow_rank  # type: ignore[method-assign]
            return model

        return loader

    server = server_factory(
        batch_max_size=1,
        batch_queue_size=2,
        retry_after_seconds=3,
        create_app_kwargs={"loader_factory": gated},
    )
    server.wait_ready()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(server.predict, [IMAGES[0]])
        assert entered.wait(10), "the first request did not reach the model"
        queued = [pool.submit(server.predict, [IMAGES[i]]) for i in (1, 2)]
        wait_for(lambda: server.metric("dmc_predict_queue_depth") == 2)
        refused = server.predict([IMAGES[3]])
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "3"
        assert "busy" in refused.json()["detail"]
        gate.set()
        assert first.result().status_code == 200
        assert [f.result().status_code for f in queued] == [200, 200]
    assert server.metric("dmc_predict_rejected_total") == 1


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)
