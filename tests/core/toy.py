"""Toy data and settings shared by the core tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dmc_core.config import LearnerConfig

FAMILIES = ["dmc-tiny-vit", "dmc-tiny-cnn-bert"]

COLOUR_NAMES = ["red", "green", "blue", "yellow", "magenta", "cyan"]

# Distinct colours: a toy task that a random tiny encoder separates.
COLOURS = [
    (230, 30, 30),
    (30, 200, 30),
    (30, 30, 230),
    (230, 230, 30),
    (200, 30, 200),
    (30, 220, 220),
]


def colour_images(
    classes: list[int], per_class: int, seed: int
) -> tuple[list[Image.Image], list[int]]:
    """Noisy solid-colour 32x32 images; labels are positions in `classes`."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, k in enumerate(classes):
        for _ in range(per_class):
            pixels = np.array(COLOURS[k])[None, None, :] + rng.normal(0, 25, (32, 32, 3))
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
            labels.append(label)
    return images, labels


def fast_config(method: str = "dmc_ot", **overrides: object) -> LearnerConfig:
    """Short schedules sized for a toy task on CPU."""
    base: dict[str, object] = {
        "stage1.epochs": 2,
        "stage1.batch_size": 16,
        "stage2.epochs": 6,
        "stage2.batch_size": 32,
        "stage2.lr": 0.01,
        "stage2.samples_per_old_class": 32,
        "calibration.samples_per_class": 32,
        "feature_batch_size": 64,
    }
    base.update(overrides)
    return LearnerConfig(method=method).with_overrides(base)  # type: ignore[arg-type]


def save_colour_folder(folder: Path, classes: dict[str, int], per_class: int, seed: int) -> Path:
    """A folder with one sub-folder of PNGs per class: `classes` maps each class name to
    the colour (index into COLOURS) its images show, so a name may be a wrong label."""
    names = list(classes)
    images, labels = colour_images([classes[n] for n in names], per_class, seed)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        target = folder / names[label] / f"{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
    return folder
