"""The base of every error `dmc_core` raises on purpose.

Each error keeps its builtin base too (`TaskError` is a `ValueError`, `BackboneError` a
`RuntimeError`), so callers may catch either `DmcError` (all of them) or the builtin one.
"""

from __future__ import annotations


class DmcError(Exception):
    """An error of the research library whose message says what to fix."""
