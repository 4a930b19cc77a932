"""Datasets by name: `@register_dataset("name")` on a loader, `get_dataset("name", **options)`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from dmc_core.data.images import ClassificationDataset
from dmc_core.errors import DmcError

__all__ = ["DatasetError", "get_dataset", "list_datasets", "register_dataset"]

DatasetLoader = Callable[..., ClassificationDataset]

_DATASETS: dict[str, DatasetLoader] = {}


class DatasetError(DmcError, ValueError):
    """A dataset that cannot be loaded as asked; the message says what to fix."""


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    """Decorator: make `loader(**options) -> ClassificationDataset` available by name."""

    def decorate(loader: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = loader
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


def get_dataset(name: str, **options: Any) -> ClassificationDataset:
    """Load a registered dataset; unknown names and options are refused with what is known."""
    loader = _loader(name)
    accepted = inspect.signature(loader).parameters
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DatasetError(
            f"dataset {name!r} has no option(s) {unknown}; its options: {sorted(accepted)}"
        )
    return loader(**options)
