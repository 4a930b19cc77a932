"""A cache of image features of frozen encoders, in memory and on disk.

An entry is one class's images of one split encoded by one encoder. Its key hashes
everything the numbers depend on: the backbone (name, weights, resolution), precision and
device type, the encoder's trainable state (the adapter's tensors; "pretrained" for the
untouched backbone), the dataset's fingerprint, the split, the class, the exact images,
the test transform and the batch size (batching can change the last bits on some
kernels). So a repeated baseline (zero-shot over seeds or runs), an identical encoder in
another method, or a resumed run reuses features instead of re-encoding images, and a
cached value always equals what encoding would give.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmc_core.files import atomic_write

__all__ = ["FeatureCache", "hash_indices", "tensor_hash"]


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def hash_indices(indices: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


class FeatureCache:
    """Features by key: an in-memory LRU (bounded in bytes) in front of an optional folder."""

    def __init__(self, root: Path | None, memory_bytes: int = 512 << 20) -> None:
        self.root = Path(root).expanduser() if root is not None else None
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(parts: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path | None:
        return None if self.root is None else self.root / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.memory_bytes:
            return
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        self._memory[key] = features
        self._bytes += size
        while self._bytes > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if path is not None and path.is_file():
            try:
                features = load_file(str(path))["features"]
            except (SafetensorError, OSError, KeyError):
                return None  # a damaged entry is recomputed and rewritten
            self._remember(key, features)
            return features
        return None

    def contains(self, key: str) -> bool:
        if key in self._memory:
            return True
        path = self._path(key)
        return path is not None and path.is_file()

    def put(self, key: str, features: torch.Tensor, parts: dict[str, Any] | None = None) -> None:
        features = features.detach().cpu().contiguous()
        self._remember(key, features)
        path = self._path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"key": json.dumps(parts or {}, sort_keys=True, default=str)}
        atomic_write(path, lambda tmp: save_file({"features": features}, str(tmp), metadata))

    def get_or_compute(
        self, parts: dict[str, Any], compute: Callable[[], torch.Tensor]
    ) -> torch.Tensor:
        key = self.key(parts)
        features = self.get(key)
        if features is not None:
            self.hits += 1
            return features
        self.misses += 1
        features = compute()
        self.put(key, features, parts)
        return features.detach().cpu()

    def stats(self) -> dict[str, Any]:
        return {
            "root": str(self.root) if self.root else None,
            "hits": self.hits,
            "misses": self.misses,
        }
