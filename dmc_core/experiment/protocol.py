"""Class-incremental protocols: `B{base}-Inc{inc}` task splits over a class order.

Conventions of PyCIL / PROOF: the class order is `np.random.seed(seed);
np.random.permutation(n_classes)` (seed 1993 by default); B0 means the first task has
`inc` classes like every other; when the classes do not divide evenly, the last task takes
the remainder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DEFAULT_ORDER_SEED", "Protocol", "class_order", "split_tasks"]

DEFAULT_ORDER_SEED = 1993

_PATTERN = re.compile(r"^\s*B(\d+)\s*-?\s*Inc(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Protocol:
    base: int
    increment: int

    @classmethod
    def parse(cls, text: str) -> Protocol:
        """`"B0-Inc10"` -> Protocol(0, 10); `"B50-Inc10"` -> Protocol(50, 10)."""
        match = _PATTERN.match(str(text))
        if match is None:
            raise ValueError(
                f"protocol {text!r} is not of the form B<base>-Inc<increment>, e.g. B0-Inc10"
            )
        base, increment = int(match.group(1)), int(match.group(2))
        if increment <= 0:
            raise ValueError(f"protocol {text!r}: the increment must be at least 1")
        return cls(base, increment)

    def __str__(self) -> str:
        return f"B{self.base}-Inc{self.increment}"

    def task_sizes(self, n_classes: int) -> list[int]:
        """Classes per task, as PyCIL's DataManager computes them."""
        if n_classes <= 0:
            raise ValueError("a protocol needs at least one class")
        first = self.base if self.base > 0 else self.increment
        if first > n_classes:
            raise ValueError(
                f"protocol {self}: the first task needs {first} classes, "
                f"the dataset has {n_classes}"
            )
        sizes = [first]
        while sum(sizes) + self.increment < n_classes:
            sizes.append(self.increment)
        if n_classes - sum(sizes) > 0:
            sizes.append(n_classes - sum(sizes))
        return sizes


def class_order(
    n_classes: int, seed: int | None = DEFAULT_ORDER_SEED, order: Sequence[int] | None = None
) -> list[int]:
    """The class order: an explicit `order`, or the seeded permutation (identity if seed is None).

    `np.random.RandomState(seed).permutation(n)` equals `np.random.seed(seed);
    np.random.permutation(n)` without touching numpy's global generator.
    """
    if order is not None:
        explicit = [int(c) for c in order]
        if sorted(explicit) != list(range(n_classes)):
            raise ValueError(
                f"class_order must be a permutation of 0..{n_classes - 1}, got {len(explicit)} "
                "entries" + ("" if len(explicit) != n_classes else " with repeats or gaps")
            )
        return explicit
    if seed is None:
        return list(range(n_classes))
    return [int(c) for c in np.random.RandomState(seed).permutation(n_classes)]


def split_tasks(order: Sequence[int], protocol: Protocol) -> list[list[int]]:
    """The dataset class ids of each task, in order."""
    tasks, start = [], 0
    for size in protocol.task_sizes(len(order)):
        tasks.append([int(c) for c in order[start : start + size]])
        start += size
    return tasks
