"""Models that are built locally instead of downloaded, by open_clip-like name.

A generic registry: a builder registers itself with `@register_model_builder(name)`, and
`dmc_core/__init__.py` imports the built-in ones (the offline stand-in), so that the
registry never has to import its entries (timm's pattern; no import cycle).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

ModelBuilder = Callable[[Path], Path]
"""Builds a model into `cache_dir` on first use and returns an open_clip `local-dir` folder."""

_BUILDERS: dict[str, ModelBuilder] = {}


def register_model_builder(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a model that is built locally (not downloaded) under an open_clip-like name."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        _BUILDERS[name] = builder
        return builder

    return decorate


def model_builder(name: str) -> ModelBuilder | None:
    return _BUILDERS.get(name)


def model_builder_names() -> list[str]:
    return sorted(_BUILDERS)
