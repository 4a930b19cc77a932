"""Datasets by name (`dmc_core.data.registry`). Importing the package registers the
built-in ones (`dmc_core.data.catalog`), so the registry never imports them itself."""

from dmc_core.data import catalog as _catalog  # noqa: F401
