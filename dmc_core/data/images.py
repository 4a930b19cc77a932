"""What a dataset is to the experiment runner: class names and two labelled splits whose
images are loaded lazily (from an in-memory array or from files) as RGB PIL images."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
from PIL import Image

__all__ = [
    "ArrayImages",
    "ClassificationDataset",
    "ConcatImages",
    "Images",
    "PathImages",
    "Split",
]


class Images(Sequence[Image.Image], ABC):
    """A sequence of RGB PIL images, each made only when it is indexed."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """The image at `index` (0 <= index < len)."""

    @abstractmethod
    def subset(self, indices: Sequence[int] | np.ndarray) -> Images:
        """The images at `indices`, in that order (still lazy)."""

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> Images: ...

    def __getitem__(self, index: int | slice) -> Image.Image | Images:
        if isinstance(index, slice):
            return self.subset(range(len(self))[index])
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        return self.load(index % n)


class ArrayImages(Images):
    """uint8 images [N, H, W] (grey) or [N, H, W, 3] (RGB) held in memory."""

    def __init__(self, array: np.ndarray, invert: bool = False) -> None:
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise ValueError(f"expected uint8 [N, H, W(, 3)], got {array.dtype} {array.shape}")
        self.array = array
        self.invert = invert

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def load(self, index: int) -> Image.Image:
        pixels = self.array[index]
        if self.invert:
            pixels = 255 - pixels
        return Image.fromarray(pixels).convert("RGB")

    def subset(self, indices: Sequence[int] | np.ndarray) -> ArrayImages:
        return ArrayImages(self.array[np.asarray(indices, dtype=np.int64)], self.invert)


class PathImages(Images):
    """Image files, opened only when indexed."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return image.convert("RGB")

    def subset(self, indices: Sequence[int] | np.ndarray) -> PathImages:
        return PathImages([self.paths[int(i)] for i in indices])


@dataclass
class Split:
    """Images and their labels (indices into the dataset's class names)."""

    images: Images
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def indices_of(self, class_index: int) -> np.ndarray:
        """Positions of one class's images, in increasing order."""
        return np.flatnonzero(self.labels == class_index)

    def subset(self, indices: Sequence[int] | np.ndarray) -> Split:
        index = np.asarray(indices, dtype=np.int64)
        return Split(self.images.subset(index), self.labels[index])


@dataclass
class ClassificationDataset:
    """A labelled dataset with train and test splits.

    `identity` describes where the data came from (dataset name, resolved folder, options,
    split sizes); its hash `fingerprint` keys cached features, so two datasets with the
    same identity must hold the same images.
    """

    name: str
    class_names: list[str]
    train: Split
    test: Split
    identity: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.class_names)
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= n):
                raise ValueError(f"{self.name} {split_name} labels must be in [0, {n})")
        duplicates = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
        if duplicates:
            raise ValueError(f"{self.name}: class names repeat: {duplicates}")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def fingerprint(self) -> str:
        identity = {
            "name": self.name,
            "classes": self.class_names,
            "train": len(self.train),
            "test": len(self.test),
            **self.identity,
        }
        text = json.dumps(identity, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def split(self, name: str) -> Split:
        if name == "train":
            return self.train
        if name == "test":
            return self.test
        raise ValueError(f"split must be 'train' or 'test', not {name!r}")


class ConcatImages(Images):
    """Several image sequences one after the other (e.g. the tasks seen so far)."""

    def __init__(self, parts: Sequence[Images]) -> None:
        self.parts = list(parts)
        self._starts = np.cumsum([0, *(len(p) for p in self.parts)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def load(self, index: int) -> Image.Image:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part][index - int(self._starts[part])]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Images:
        return _Selection(self, np.asarray(indices, dtype=np.int64))


class _Selection(Images):
    def __init__(self, base: Images, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.base[int(self.indices[index])]

    def subset(self, indices: Sequence[int] | np.ndarray) -> Images:
        return _Selection(self.base, self.indices[np.asarray(indices, dtype=np.int64)])
