"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (idx gz files, read with numpy)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Label order of the dataset; names chosen to read well in "a photo of a {}." prompts.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

Split = Literal["train", "test"]

_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def load_fashion_mnist(
    split: Split, root: Path = FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] (white garment on black) and labels int64 [N]."""
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = Path(root) / _PREFIX[split]
    images = _read_idx(Path(f"{prefix}-images-idx3-ubyte.gz"), _IMAGES_MAGIC)
    labels = _read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz"), _LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def to_pil(images: np.ndarray, invert: bool = False) -> list[Image.Image]:
    """RGB PIL images from uint8 [N, H, W]; ``invert`` gives dark garments on white."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 [N, H, W], got {images.dtype} {images.shape}")
    if invert:
        images = 255 - images
    return [Image.fromarray(image).convert("RGB") for image in images]


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} not found: install the Debian package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) "
            "or pass the folder that holds the idx .gz files as `root`"
        )
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, dtype=">i4", count=2)
    if header[0] != magic:
        raise ValueError(f"{path}: idx magic {header[0]}, expected {magic}")
    ndim = magic & 0xFF
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    # Copy: frombuffer views are read-only, which torch.from_numpy warns about.
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()
