"""server.batcher: batch limits, versions kept apart, cancelled requests (without HTTP);
concurrent requests share forward passes and a full queue is 503 (over HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server.app import _default_loader
from server.batcher import Batcher, BatcherStoppedError, QueueFullError
from server.metrics import Metrics
from server.model import LoadedModel, Loader, Ranked
from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import Server, colour_pngs


class FakeModel:
    """Ranks image i as class round(pixels[i].mean()); records each forward pass."""

    def __init__(self, version_id: int, gate: threading.Event | None = None) -> None:
        self.version_id = version_id
        self.passes: list[int] = []
        self.gate = gate

    def rank(self, pixels: torch.Tensor, top_k: Sequence[int]) -> list[Ranked]:
        if self.gate is not None:
            self.gate.wait(10)
        self.passes.append(len(pixels))
        return [
            Ranked([f"v{self.version_id}-{round(float(p.mean()))}"], [1.0], [0]) for p in pixels
        ]


def image(value: float) -> torch.Tensor:
    return torch.full((1, 3, 4, 4), float(value))


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


def test_batches_fill_up_to_the_maximum_and_keep_versions_apart() -> None:
    async def scenario() -> tuple[list[list[Ranked]], FakeModel, FakeModel]:
        batcher = Batcher(max_batch=4, max_wait_seconds=0.2, capacity=100, metrics=Metrics())
        await batcher.start()
        old, new = FakeModel(1), FakeModel(2)
        with batcher.incoming(10):  # everything arrives together
            calls = [
                batcher.submit(old if i % 2 else new, image(i), top_k=1)  # type: ignore[arg-type]
                for i in range(10)
            ]
            results = await asyncio.gather(*calls)
        await batcher.stop()
        return results, old, new

    results, old, new = run(scenario())  # type: ignore[misc]
    assert [r[0].names[0] for r in results] == [f"v{1 if i % 2 else 2}-{i}" for i in range(10)]
    assert sum(old.passes) == 5 and sum(new.passes) == 5
    assert max(old.passes + new.passes) <= 4
    assert len(old.passes) + len(new.passes) <= 6


def test_a_lone_request_does_not_wait() -> None:
    async def scenario() -> float:
        batcher = Batcher(max_batch=32, max_wait_seconds=5.0, capacity=10, metrics=Metrics())
        await batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(FakeModel(1), image(1), top_k=1)  # type: ignore[arg-type]
        elapsed = loop.time() - started
        await batcher.stop()
        return elapsed

    assert run(scenario()) < 1.0  # type: ignore[operator]


def test_full_queue_cancelled_requests_and_stop() -> None:
    gate = threading.Event()

    async def scenario() -> None:
        batcher = Batcher(max_batch=1, max_wait_seconds=0, capacity=2, metrics=Metrics())
        await batcher.start()
        model = FakeModel(1, gate)
        first = asyncio.ensure_future(batcher.submit(model, image(0), 1))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # taken into a batch: blocks on the gate
        cancelled = asyncio.ensure_future(batcher.submit(model, image(1), 1))  # type: ignore[arg-type]
        waiting = asyncio.ensure_future(batcher.submit(model, image(2), 1))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert batcher.waiting == 2
        with pytest.raises(QueueFullError):
            await batcher.submit(model, image(3), 1)  # type: ignore[arg-type]
        cancelled.cancel()
        gate.set()
        assert (await first)[0].names == ["v1-0"]
        assert (await waiting)[0].names == ["v1-2"]
        assert model.passes == [1, 1]  # the cancelled image never reached the model
        gate.clear()
        blocked = asyncio.ensure_future(batcher.submit(model, image(4), 1))  # type: ignore[arg-type]
        queued = asyncio.ensure_future(batcher.submit(model, image(5), 1))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        gate.set()
        await batcher.stop()
        for future in (blocked, queued):
            with pytest.raises(BatcherStoppedError):
                await future

    run(scenario())


# --- over HTTP ---------------------------------------------------------------------

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
