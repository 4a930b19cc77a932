"""What a version changed against its parent (`ClassChange`), and how that turns the
parent's class list into the version's. Class names are unique within a version, hence
within the lineage a task builds on; abandoned branches do not count."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from store.errors import ClassNotFoundError, DuplicateClassError
from store.models import TaskKind


@dataclass(frozen=True)
class ClassChange:
    kind: TaskKind
    # add: the new classes; extend: those given more images; remove: those removed;
    # rename: the old name.
    classes: tuple[str, ...]
    renamed: Mapping[str, str] = field(default_factory=dict)  # rename: old -> new

    @classmethod
    def of_task(
        cls, kind: TaskKind, classes: Sequence[str], arguments: Mapping[str, Any] | None
    ) -> ClassChange:
        renamed = {classes[0]: str((arguments or {})["name"])} if kind == TaskKind.RENAME else {}
        return cls(TaskKind(kind), tuple(classes), renamed)

    def apply(self, names: Sequence[str]) -> list[str]:
        """The class list after this change of `names` (label order kept)."""
        current = list(names)
        if self.kind == TaskKind.ADD:
            taken = [n for n in self.classes if n in current]
            if taken:
                raise DuplicateClassError(taken)
            return current + list(self.classes)
        missing = [n for n in self.classes if n not in current]
        if missing:
            raise ClassNotFoundError(missing)
        if self.kind == TaskKind.REMOVE:
            return [n for n in current if n not in self.classes]
        if self.kind == TaskKind.RENAME:
            taken = [n for n in self.renamed.values() if n in current]
            if taken:
                raise DuplicateClassError(taken)
            return [self.renamed.get(n, n) for n in current]
        return current  # extend

    @property
    def added(self) -> tuple[str, ...]:
        """Names the version brings that its parent did not have."""
        if self.kind == TaskKind.ADD:
            return self.classes
        return tuple(self.renamed.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "classes": list(self.classes),
            "renamed": dict(self.renamed),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ClassChange:
        data = data or {}
        return cls(
            TaskKind(data.get("kind", TaskKind.ADD)),
            tuple(data.get("classes", ())),
            dict(data.get("renamed", {})),
        )

    def describe(self) -> str:
        """One line for people: "added a, b", "renamed a to b"."""
        if self.kind == TaskKind.RENAME:
            return "renamed " + ", ".join(f"{a} to {b}" for a, b in self.renamed.items())
        verb = {TaskKind.ADD: "added", TaskKind.EXTEND: "extended", TaskKind.REMOVE: "removed"}
        return f"{verb[self.kind]} {', '.join(self.classes)}"
