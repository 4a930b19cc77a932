"""Images to model input, in two halves: the PIL work on the CPU (in DataLoader workers)
gives uint8 pixels, and the device turns a uint8 batch into the model's float input.

open_clip's transforms end with `ToTensor` (uint8 -> float / 255) and `Normalize`.
`split_transform` cuts them off and `PixelTransform.finish` applies the same operations
to a whole batch on the device, so the input has the same bits as the transform's own,
while a quarter of the bytes cross to the device (and can be kept once per task).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import Compose, Normalize, PILToTensor, ToTensor

# DataLoader workers when `LearnerConfig.loader_workers` is None and the device is a GPU.
MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class PixelTransform:
    """`to_uint8` (PIL image -> uint8 [C, H, W]) and the normalisation that `finish` runs
    on a batch. Without `mean` (a transform `split_transform` could not cut), `to_uint8` is
    the whole transform and `finish` passes its float output through."""

    to_uint8: Callable[[Any], torch.Tensor]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def finish(self, pixels: torch.Tensor) -> torch.Tensor:
        """The model's float input of a batch from `to_uint8`, on the batch's device."""
        if pixels.dtype != torch.uint8:
            return pixels
        if self.mean is None or self.std is None:
            raise ValueError("uint8 pixels, but the transform has no normalisation to apply")
        # torchvision's Normalize, less its check that no std is 0 (a host-device sync).
        mean, std = (
            _channel_values(self.mean, pixels.device),
            _channel_values(self.std, pixels.device),
        )
        return pixels.float().div(255).sub_(mean).div_(std)


@functools.cache
def _channel_values(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1, 1)


def split_transform(transform: Callable[[Any], torch.Tensor]) -> PixelTransform:
    """Cut a `Compose(..., ToTensor, Normalize)` before its float steps."""
    steps = list(getattr(transform, "transforms", []))
    if (
        isinstance(transform, Compose)
        and len(steps) >= 2
        and isinstance(steps[-2], ToTensor)
        and isinstance(steps[-1], Normalize)
    ):
        normalize = steps[-1]
        return PixelTransform(
            Compose([*steps[:-2], PILToTensor()]),
            tuple(float(v) for v in normalize.mean),
            tuple(float(v) for v in normalize.std),
        )
    return PixelTransform(transform)


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes: `requested`, or with None none on a CPU (the main
    thread's preprocessing overlaps nothing there) and up to 8 on a GPU."""
    if requested is not None:
        return requested
    if device.type == "cpu":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))


class _Labelled(Dataset[tuple[torch.Tensor, int]]):
    def __init__(
        self, images: Sequence[Any], labels: Sequence[int], transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


def image_batches(
    images: Sequence[Any],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    *,
    workers: int,
    device: torch.device,
    labels: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """Batches of (transformed images, labels), made by `workers` processes, in pinned
    memory when they go to a GPU; shuffled by `generator` when one is given."""
    return DataLoader(
        _Labelled(images, labels if labels is not None else [0] * len(images), transform),
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )


def preprocess_all(
    images: Sequence[Any],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int,
    *,
    workers: int,
    device: torch.device,
) -> torch.Tensor:
    """Every image through `transform`, stacked in order (pinned for a GPU)."""
    out: torch.Tensor | None = None
    start = 0
    # The batches stay unpinned: they are copied into `out`, which is pinned once.
    host = torch.device("cpu")
    for pixels, _ in image_batches(images, transform, batch_size, workers=workers, device=host):
        if out is None:
            out = torch.empty(
                (len(images), *pixels.shape[1:]),
                dtype=pixels.dtype,
                pin_memory=device.type == "cuda",
            )
        out[start : start + len(pixels)] = pixels
        start += len(pixels)
    if out is None:
        raise ValueError("no images to preprocess")
    return out


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; from host memory to a GPU through pinned memory, without
    making the host wait for the copy."""
    if device.type == "cuda" and pixels.device.type == "cpu" and not pixels.is_pinned():
        pixels = pixels.pin_memory()
    return pixels.to(device, non_blocking=True)
