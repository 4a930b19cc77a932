"""The versions as a tree for the dashboard: depth-first from the roots (children oldest
first), each with its depth, whether it is on the active branch (the active version and
its ancestors), and what it changed against its parent."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from store.lineage import ClassChange
from store.registry import VersionInfo


@dataclass(frozen=True)
class TreeRow:
    version: VersionInfo
    depth: int
    on_active_branch: bool
    change: str


def version_tree(versions: list[VersionInfo], active_id: int | None) -> list[TreeRow]:
    by_id = {v.id: v for v in versions}
    children: dict[int | None, list[VersionInfo]] = defaultdict(list)
    for version in sorted(versions, key=lambda v: v.id):
        # A parent not in the list (beyond the page) makes the version a root here.
        children[version.parent_id if version.parent_id in by_id else None].append(version)
    branch: set[int] = set()
    cursor = by_id.get(active_id) if active_id is not None else None
    while cursor is not None:
        branch.add(cursor.id)
        cursor = by_id.get(cursor.parent_id) if cursor.parent_id is not None else None
    rows: list[TreeRow] = []
    stack = [(v, 0) for v in reversed(children[None])]
    while stack:
        version, depth = stack.pop()
        change = ClassChange.from_json(version.change).describe()
        rows.append(TreeRow(version, depth, version.id in branch, change))
        stack += [(child, depth + 1) for child in reversed(children[version.id])]
    return rows
