"""The model the server answers with: the `active` version's learner, merged for inference.

`ModelHolder` polls the `active` alias (a change made through another replica is seen
within `version_poll_seconds`), loads a new active version in a thread while the old one
keeps answering, and swaps the reference; the batcher takes the reference per request, so
a swap happens between batches and never fails a request. A version that fails to load
leaves the old one serving and is reported by `status()` (GET /readyz). Requests that pin
a version get it from a small LRU of loaded versions, bounded in count and in bytes;
versions load one at a time (`loads_at_once`), and a pinned request that cannot start its
load within `load_wait_seconds` gets `LoadsBusyError` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dmc_core.learner import Learner
from server.errors import ServerError
from server.metrics import Metrics
from store.registry import Registry, VersionInfo
from worker.model import load_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranked:
    """The top classes of one image, best first."""

    names: list[str]
    probabilities: list[float]
    indices: list[int]


class LoadedModel:
    """One version's learner, ready to answer (its adapter merged into the weights)."""

    def __init__(self, version_id: int, learner: Learner) -> None:
        self.version_id = version_id
        self.learner = learner
        self.class_names = tuple(learner.class_names)
        self.nbytes = _tensor_bytes(learner)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The model's input tensor for PIL images (runs in a request's worker thread)."""
        return self.learner.preprocess(images)

    def rank(self, pixels: torch.Tensor, top_k: Sequence[int]) -> list[Ranked]:
        """One forward pass over a batch; `top_k[i]` classes for image i."""
        probabilities = self.learner.logits(pixels).softmax(dim=-1)
        k = min(max(top_k), probabilities.shape[1])
        top = probabilities.topk(k, dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        ranked = []
        for row_values, row_indices, wanted in zip(values, indices, top_k, strict=True):
            row_values, row_indices = row_values[:wanted], row_indices[:wanted]
            names = [self.class_names[i] for i in row_indices]
            ranked.append(Ranked(names, row_values, row_indices))
        return ranked

    def warm_up(self) -> None:
        """One forward pass on a blank image, so the first request does not pay for it."""
        blank = Image.new("RGB", (32, 32))
        self.rank(self.preprocess([blank]), [1])


def _tensor_bytes(learner: Learner) -> int:
    """The bytes of the learner's model weights and buffers (what a loaded version holds)."""
    model = learner.backbone.model
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


Loader = Callable[[int], LoadedModel]
"""Loads a version (blocking; runs in a thread)."""


def store_loader(
    registry: Registry,
    *,
    device: str,
    cache_dir: Path | None,
    precision: str | None = None,
    work_dir: Path | None = None,
) -> Loader:
    """A loader that fetches the version's inference part from the store (checking every
    blob; never the Gaussian memory), checks it holds the classes the registry lists
    (`worker.model.load_version`) and predicts with its cached class prototypes, on
    `device` in `precision` (DMC_PRECISION, whatever the version was saved with)."""

    def load(version_id: int) -> LoadedModel:
        learner = load_version(
            registry,
            version_id,
            part="inference",
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            folder=_scratch(work_dir, version_id),
        )
        learner.merge_for_inference()
        model = LoadedModel(version_id, learner)
        model.warm_up()
        return model

    return load


def _scratch(work_dir: Path | None, version_id: int) -> Path | None:
    if work_dir is None:
        return None
    return work_dir / f"serve-{version_id}-{uuid.uuid4().hex[:8]}"


class NoActiveVersionError(ServerError):
    """No version can answer yet (none is active, or the active one is still loading)."""


class VersionLoadError(ServerError):
    """A pinned version cannot be loaded."""


class LoadsBusyError(ServerError):
    """Every version-load slot stayed taken for as long as a request waits: 503."""


@dataclass
class _Failure:
    version_id: int
    message: str
    at: float


class ModelHolder:
    def __init__(
        self,
        registry: Registry,
        loader: Loader,
        *,
        metrics: Metrics,
        poll_seconds: float = 2.0,
        retry_seconds: float = 60.0,
        cache_size: int = 2,
        cache_bytes: int | None = None,
        loads_at_once: int = 1,
        load_wait_seconds: float = 5.0,
    ) -> None:
        self.registry = registry
        self.loader = loader
        self.metrics = metrics
        self.poll_seconds = poll_seconds
        self.retry_seconds = retry_seconds
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.load_wait_seconds = load_wait_seconds
        # Each load holds about one model's memory until it is cached or dropped.
        self._slots = asyncio.Semaphore(loads_at_once)
        self.current: LoadedModel | None = None
        self.active_id: int | None = None
        self.checked = False
        self.loading: int | None = None
        self._failures: dict[int, _Failure] = {}
        # Why the `active` alias could not be read (the exception's text: admin eyes only).
        self.poll_error: str | None = None
        self._cache: OrderedDict[int, LoadedModel] = OrderedDict()
        self._loads: dict[int, asyncio.Future[LoadedModel]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dmc-model-holder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def wake(self) -> None:
        """Look at the `active` alias now (it was just changed through this server)."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poller die
                log.exception("checking the active version failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    # --- the active version ----------------------------------------------------------

    async def refresh(self) -> None:
        """Read the `active` alias; load and swap in a new active version."""
        try:
            active: VersionInfo | None = await asyncio.to_thread(self.registry.active)
        except Exception as exc:
            self.poll_error = str(exc) or type(exc).__name__
            log.warning("reading the active version failed: %s", exc)
            return
        self.poll_error = None
        self.checked = True
        if active is None:
            self.active_id = None
            return
        self.active_id = active.id
        current = self.current
        if current is not None and current.version_id == active.id:
            return
        if self._recent_failure(active.id) is not None:
            return
        try:
            model = await self._get_or_load(active.id)
        except Exception as exc:
            message = self._failed(active.id, exc).message
            log.error(
                "version %d could not be loaded (still serving %s): %s",
                active.id,
                current.version_id if current else "nothing",
                message,
            )
            return
        self._swap(model)

    @property
    def failure(self) -> _Failure | None:
        """Why the active version is not the one answering, if it failed to load."""
        if self.active_id is None:
            return None
        if self.current is not None and self.current.version_id == self.active_id:
            return None
        return self._failures.get(self.active_id)

    def _recent_failure(self, version_id: int) -> _Failure | None:
        failure = self._failures.get(version_id)
        if failure is not None and time.monotonic() - failure.at < self.retry_seconds:
            return failure
        return None

    def _failed(self, version_id: int, exc: BaseException) -> _Failure:
        failure = _Failure(version_id, str(exc) or type(exc).__name__, time.monotonic())
        self._failures[version_id] = failure
        self.metrics.model_loads.labels(outcome="failure").inc()
        return failure

    def _swap(self, model: LoadedModel) -> None:
        previous = self.current
        self.current = model
        self._failures.pop(model.version_id, None)
        self._cache.pop(model.version_id, None)
        if previous is not None and previous.version_id != model.version_id:
            self._remember(previous)
        self.metrics.model_version.set(model.version_id)
        self.metrics.model_swaps.inc()
        log.info(
            "now serving version %d (was %s)",
            model.version_id,
            previous.version_id if previous else "none",
        )

    def _remember(self, model: LoadedModel) -> None:
        if self.cache_size <= 0:
            return
        self._cache[model.version_id] = model
        self._cache.move_to_end(model.version_id)
        while len(self._cache) > self.cache_size or (
            self.cache_bytes is not None and self.cached_bytes() > self.cache_bytes
        ):
            self._cache.popitem(last=False)

    def cached_bytes(self) -> int:
        return sum(model.nbytes for model in self._cache.values())

    @property
    def cached_versions(self) -> list[int]:
        """The versions kept for pinned requests, least recently used first."""
        return list(self._cache)

    async def _get_or_load(self, version_id: int, *, wait: float | None = None) -> LoadedModel:
        """The version from the cache, the load in flight, or a new load once a slot is
        free: after at most `wait` seconds (None: as long as it takes) else
        `LoadsBusyError`."""
        cached = self._cache.get(version_id)
        if cached is not None:
            self._cache.move_to_end(version_id)
            return cached
        pending = self._loads.get(version_id)
        if pending is None:
            await self._take_slot(version_id, wait)
            pending = self._loads.get(version_id)  # started by another request meanwhile
            if pending is None:
                pending = asyncio.ensure_future(self._load(version_id))
                self._loads[version_id] = pending
                pending.add_done_callback(lambda done: self._loaded(version_id, done))
            else:
                self._slots.release()
        # shield: a request that gives up must not cancel a load others wait for.
        return await asyncio.shield(pending)

    async def _take_slot(self, version_id: int, wait: float | None) -> None:
        acquiring = asyncio.ensure_future(self._slots.acquire())
        try:
            await asyncio.wait_for(asyncio.shield(acquiring), wait)
        except BaseException as exc:
            # Given up (timeout, or the request cancelled): never keep a slot taken.
            if not acquiring.cancel() and acquiring.exception() is None:
                self._slots.release()
            if isinstance(exc, TimeoutError):
                raise LoadsBusyError(
                    f"{len(self._loads)} versions are loading; version {version_id} cannot "
                    f"start within {wait:g}s (DMC_VERSION_LOADS_AT_ONCE)"
                ) from None
            raise

    def _loaded(self, version_id: int, done: asyncio.Future[LoadedModel]) -> None:
        self._loads.pop(version_id, None)
        self._slots.release()
        if not done.cancelled():
            done.exception()  # retrieved: waiters that gave up must not leave it unread

    async def _load(self, version_id: int) -> LoadedModel:
        self.loading = version_id
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self.loader, version_id)
        finally:
            self.loading = None
        self.metrics.model_loads.labels(outcome="success").inc()
        log.info("loaded version %d in %.2fs", version_id, time.perf_counter() - started)
        return model

    # --- for requests ----------------------------------------------------------------

    async def get(self, version_id: int | None = None) -> LoadedModel:
        """The model for a request: the active one, or the pinned `version_id`.

        Raises `NoActiveVersionError` (nothing to answer with yet), `VersionNotFoundError`
        (unknown version) or `VersionLoadError` (the pinned version cannot be loaded).
        """
        current = self.current
        if version_id is None or (current is not None and current.version_id == version_id):
            if current is None:
                raise NoActiveVersionError(self.not_ready_reason())
            return current
        cached = self._cache.get(version_id)
        if cached is not None:
            self._cache.move_to_end(version_id)
            return cached
        await asyncio.to_thread(self.registry.get, version_id)  # VersionNotFoundError
        failure = self._recent_failure(version_id)
        if failure is not None:
            raise VersionLoadError(f"version {version_id} cannot be loaded: {failure.message}")
        try:
            model = await self._get_or_load(version_id, wait=self.load_wait_seconds)
        except LoadsBusyError:
            raise
        except Exception as exc:
            failure = self._failed(version_id, exc)
            raise VersionLoadError(
                f"version {version_id} cannot be loaded: {failure.message}"
            ) from exc
        self._failures.pop(version_id, None)
        if self.current is None or self.current.version_id != version_id:
            self._remember(model)
        return model

    def not_ready_reason(self, *, detailed: bool = False) -> str:
        """Why no version answers. The text of errors (which may name the database host or
        the object store's bucket and keys) only when `detailed`."""
        if self.poll_error is not None:
            return "the database does not answer" + _detail(self.poll_error, detailed)
        if not self.checked:
            return "the server is starting: the active version is being looked up"
        if self.active_id is None:
            return (
                "no version is active yet: add classes with POST /classes and wait for the "
                "job to finish"
            )
        if self.failure is not None and self.failure.version_id == self.active_id:
            return f"the active version {self.active_id} could not be loaded" + _detail(
                self.failure.message, detailed
            )
        return f"the active version {self.active_id} is loading"

    def status(self, *, detailed: bool = False) -> dict[str, Any]:
        """What GET /readyz reports (error texts only when `detailed`)."""
        current = self.current
        failure = self.failure
        return {
            "version_id": current.version_id if current else None,
            "active_version_id": self.active_id,
            "loading_version_id": self.loading,
            "device": str(current.learner.device) if current else None,
            "error": (
                f"version {failure.version_id} could not be loaded"
                + _detail(failure.message, detailed)
                if failure is not None
                else None
            ),
        }


def _detail(message: str, detailed: bool) -> str:
    return f": {message}" if detailed else " (an admin key sees why)"
