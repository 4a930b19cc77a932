"""Datasets by name: `@register_dataset("name")` on a loader, `get_dataset("name", **options)`.

A dataset built from downloaded files also registers the step that fetches and builds
them (`register_dataset("name", fetch=...)`, run by `fetch_dataset` / `dmc datasets
fetch`); loading never reaches the network."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dmc_core.data.images import ClassificationDataset
from dmc_core.errors import DmcError

__all__ = [
    "DatasetError",
    "fetch_dataset",
    "get_dataset",
    "list_datasets",
    "register_dataset",
]

DatasetLoader = Callable[..., ClassificationDataset]
DatasetFetcher = Callable[..., object]

_DATASETS: dict[str, DatasetLoader] = {}
_FETCHERS: dict[str, DatasetFetcher] = {}


class DatasetError(DmcError, ValueError):
    """A dataset that cannot be loaded as asked; the message says what to fix."""


def register_dataset(
    name: str, fetch: DatasetFetcher | None = None
) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make `loader(**options) -> ClassificationDataset` available by name;
    `fetch(**options)` downloads and builds what the loader reads."""

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = loader
        if fetch is not None:
            _FETCHERS[name] = fetch
        return loader

    return decorate


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def dataset_options(name: str) -> dict[str, Any]:
    """The options a dataset takes, with their defaults (inspect.Parameter.empty if none)."""
    loader = _loader(name)
    return {p.name: p.default for p in inspect.signature(loader).parameters.values()}


def _loader(name: str) -> DatasetLoader:
    if name not in _DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def _check_options(name: str, step: Callable[..., object], options: dict[str, Any]) -> None:
    accepted = inspect.signature(step).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"dataset {name!r} has no option(s) {unknown}; its options: {sorted(accepted)}"
        )


def get_dataset(name: str, **options: Any) -> ClassificationDataset:
    """Load a registered dataset; unknown names and options are refused with what is known."""
    loader = _loader(name)
    _check_options(name, loader, options)
    return loader(**options)


def fetch_dataset(name: str, **options: Any) -> object:
    """Download and build a dataset that has a fetch step (network: the install step only)."""
    _loader(name)
    if name not in _FETCHERS:
        raise DatasetError(
            f"dataset {name!r} reads local files and has nothing to fetch; "
            f"fetchable: {', '.join(sorted(_FETCHERS))}"
        )
    _check_options(name, _FETCHERS[name], options)
    return _FETCHERS[name](**options)
