"""server.batcher without HTTP: batch limits, versions kept apart, cancelled requests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest
import torch

from server.batcher import Batcher, BatcherStoppedError, QueueFullError
from server.metrics import Metrics
from server.model import Ranked


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
