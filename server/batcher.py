"""The inference micro-batcher.

Predict requests put their (already decoded and preprocessed) images on one queue; a
single task takes them off in batches of up to `max_batch` images and runs one forward
pass per batch on a dedicated thread. A batch waits for more images only while requests
are being decoded (`incoming`), and `max_wait` seconds after its first image at most.
While a batch runs, the next one gathers, so under load batches fill up without waiting.
Images of different versions (a swap in progress, or a
pinned version) go through separate forward passes of the same round.

The queue is bounded (in images): a request that does not fit is refused at once
(`QueueFullError`, answered 503 with Retry-After) instead of waiting without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from server.errors import ServerError
from server.metrics import Metrics
from server.model import LoadedModel, Ranked

log = logging.getLogger(__name__)


class QueueFullError(ServerError):
    def __init__(self, waiting: int, capacity: int) -> None:
        super().__init__(f"{waiting} images are waiting for the model (capacity {capacity})")
        self.waiting = waiting
        self.capacity = capacity


class BatcherStoppedError(ServerError):
    """The server is shutting down."""


@dataclass
class _Item:
    model: LoadedModel
    pixels: torch.Tensor
    top_k: int
    future: asyncio.Future[Ranked]


class Batcher:
    def __init__(
        self, *, max_batch: int, max_wait_seconds: float, capacity: int, metrics: Metrics
    ) -> None:
        if max_batch < 1 or capacity < 1:
            raise ValueError("max_batch and capacity must be at least 1")
        self.max_batch = max_batch
        self.max_wait = max_wait_seconds
        self.capacity = capacity
        self.metrics = metrics
        self.forward_passes = 0
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._waiting = 0
        self._incoming = 0
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        """Images queued and not yet taken into a batch."""
        return self._waiting

    @contextlib.contextmanager
    def incoming(self, count: int) -> Iterator[None]:
        """Announce `count` images that are being decoded and will be submitted next: a
        batch that is gathering waits for them (up to the max wait), while with nothing
        on the way it closes at once, so a lone request does not wait for company."""
        self._incoming += count
        try:
            yield
        finally:
            self._incoming -= count

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dmc-inference")
        self._task = asyncio.create_task(self._run(), name="dmc-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(BatcherStoppedError("the server is shutting down"))
        self._set_waiting(0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, model: LoadedModel, pixels: torch.Tensor, top_k: int) -> list[Ranked]:
        """Rank each image of `pixels` (N, C, H, W) with `model`; waits for its batches."""
        if self._task is None:
            raise BatcherStoppedError("the batcher is not running")
        count = int(pixels.shape[0])
        if self._waiting + count > self.capacity:
            self.metrics.rejected.inc()
            raise QueueFullError(self._waiting, self.capacity)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Ranked]] = []
        for row in pixels:
            future: asyncio.Future[Ranked] = loop.create_future()
            self._queue.put_nowait(_Item(model, row, top_k, future))
            futures.append(future)
        self._set_waiting(self._waiting + count)
        # If the request is cancelled, gather cancels the futures; the batch skips them.
        return list(await asyncio.gather(*futures))

    def _set_waiting(self, value: int) -> None:
        self._waiting = value
        self.metrics.queue_depth.set(value)

    async def _next_batch(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            if self._incoming <= 0:
                break  # nothing is on the way
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        self._set_waiting(max(0, self._waiting - len(batch)))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [item for item in batch if not item.future.done()]
            groups: dict[int, list[_Item]] = {}
            for item in live:
                groups.setdefault(id(item.model), []).append(item)
            for items in groups.values():
                started = time.perf_counter()
                try:
                    ranked = await loop.run_in_executor(self._executor, _forward, items)
                except asyncio.CancelledError:
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(BatcherStoppedError("shutting down"))
                    raise
                except Exception as exc:
                    log.exception("a forward pass of %d images failed", len(items))
                    for item in items:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    continue
                self.forward_passes += 1
                self.metrics.batch_size.observe(len(items))
                self.metrics.batch_seconds.observe(time.perf_counter() - started)
                self.metrics.images.inc(len(items))
                for item, result in zip(items, ranked, strict=True):
                    if not item.future.done():
                        item.future.set_result(result)


def _forward(items: list[_Item]) -> list[Ranked]:
    pixels = torch.stack([item.pixels for item in items])
    return items[0].model.rank(pixels, [item.top_k for item in items])
