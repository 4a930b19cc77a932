"""The dataset registry and the folder layouts of the PyCIL / PILOT / PROOF family."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dmc_core.data.images import ArrayImages, ConcatImages, PathImages
from dmc_core.data.registry import DatasetError, get_dataset, list_datasets


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 6, 3), value, dtype=np.uint8)).save(path)


def _class_folders(root: Path, names: list[str], per_class: int) -> None:
    for k, name in enumerate(names):
        for i in range(per_class):
            _image(root / name / f"img_{i}.png", 40 * k + i)


def test_registry_lists_and_refuses() -> None:
    assert {"cifar100", "imagenet_r", "cub200", "ucf101", "fashion_mnist", "imagefolder"} <= set(
        list_datasets()
    )
    with pytest.raises(DatasetError, match=r"unknown dataset 'cifar10'; known: .*cifar100"):
        get_dataset("cifar10")
    with pytest.raises(DatasetError, match=r"no option\(s\) \['colour'\].*root"):
        get_dataset("imagefolder", root="x", colour=True)


def test_imagefolder_with_train_and_test(tmp_path: Path) -> None:
    _class_folders(tmp_path / "train", ["red_apple", "banana"], 3)
    _class_folders(tmp_path / "test", ["red_apple", "banana"], 2)
    (tmp_path / "train" / "banana" / "notes.txt").write_text("not an image")
    dataset = get_dataset("imagefolder", root=str(tmp_path))
    assert dataset.class_names == ["banana", "red apple"]  # sorted folders, readable names
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dataset.test.labels.tolist() == [0, 0, 1, 1]
    image = dataset.train.images[4]
    assert isinstance(dataset.train.images, PathImages)
    assert image.mode == "RGB" and image.size == (6, 6)
    assert np.asarray(image)[0, 0, 0] == 40 * 0 + 1  # red_apple's second image
    assert dataset.fingerprint == get_dataset("imagefolder", root=str(tmp_path)).fingerprint
    (tmp_path / "class_names.json").write_text(json.dumps({"red_apple": "apple"}))
    renamed = get_dataset("imagefolder", root=str(tmp_path))
    assert renamed.class_names == ["banana", "apple"]
    assert renamed.fingerprint != dataset.fingerprint


def test_imagefolder_seeded_split(tmp_path: Path) -> None:
    _class_folders(tmp_path, ["a", "b", "c"], 10)
    one = get_dataset("imagefolder", root=str(tmp_path), split_seed=3, test_fraction=0.3)
    again = get_dataset("imagefolder", root=str(tmp_path), split_seed=3, test_fraction=0.3)
    other = get_dataset("imagefolder", root=str(tmp_path), split_seed=4, test_fraction=0.3)
    assert isinstance(one.train.images, PathImages) and isinstance(one.test.images, PathImages)
    assert one.train.images.paths == again.train.images.paths
    assert one.train.images.paths != other.train.images.paths
    assert not set(one.train.images.paths) & set(one.test.images.paths)
    assert np.bincount(one.test.labels).tolist() == [3, 3, 3]
    assert np.bincount(one.train.labels).tolist() == [7, 7, 7]
    assert one.fingerprint != other.fingerprint


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        get_dataset("imagefolder", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="no class sub-folders"):
        get_dataset("imagefolder", root=str(tmp_path))
    _class_folders(tmp_path / "lonely", ["x"], 1)
    with pytest.raises(DatasetError, match="at least 2"):
        get_dataset("imagefolder", root=str(tmp_path / "lonely"))
    _class_folders(tmp_path / "mixed" / "train", ["x"], 2)
    _class_folders(tmp_path / "mixed" / "test", ["x", "y"], 2)
    with pytest.raises(DatasetError, match=r"lacks: \['y'\]"):
        get_dataset("imagefolder", root=str(tmp_path / "mixed"))


def test_cub200_proof_layout(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _class_folders(tmp_path / split, ["001.Black_footed_Albatross", "002.Laysan_Albatross"], 2)
    dataset = get_dataset("cub200", root=str(tmp_path))
    assert dataset.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert len(dataset.train) == len(dataset.test) == 4


def test_cub200_official_layout(tmp_path: Path) -> None:
    folder = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows = []
    for k, name in enumerate(classes):
        for i in range(3):
            image_id = 3 * k + i + 1
            _image(folder / "images" / name / f"{i}.jpg", image_id)
            rows.append((image_id, f"{name}/{i}.jpg", k + 1, int(i < 2)))
    (folder / "images.txt").write_text("".join(f"{r[0]} {r[1]}\n" for r in rows))
    (folder / "image_class_labels.txt").write_text("".join(f"{r[0]} {r[2]}\n" for r in rows))
    (folder / "train_test_split.txt").write_text("".join(f"{r[0]} {r[3]}\n" for r in rows))
    (folder / "classes.txt").write_text("".join(f"{k + 1} {n}\n" for k, n in enumerate(classes)))
    dataset = get_dataset("cub200", root=str(tmp_path))
    assert dataset.class_names == ["Black footed Albatross", "Laysan Albatross"]
    assert dataset.train.labels.tolist() == [0, 0, 1, 1]
    assert dataset.test.labels.tolist() == [0, 1]


def test_ucf101_and_imagenet_r_names(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _class_folders(tmp_path / "ucf" / split, ["ApplyEyeMakeup", "YoYo", "Playing_Daf"], 1)
    ucf = get_dataset("ucf101", root=str(tmp_path / "ucf"))
    assert ucf.class_names == ["Apply Eye Makeup", "Playing Daf", "Yo Yo"]
    # The original ImageNet-R release has no split: it is split by seed.
    _class_folders(tmp_path / "imr", ["n01443537", "n01484850", "n99999999"], 5)
    imr = get_dataset("imagenet_r", root=str(tmp_path / "imr"))
    assert imr.class_names == ["goldfish", "great white shark", "n99999999"]
    assert len(imr.train) + len(imr.test) == 15 and np.bincount(imr.test.labels).tolist() == [
        1,
        1,
        1,
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar100", "cifar-100-python"),
        ("imagenet_r", "ROOT/train/<wnid>"),
        ("cub200", "CUB_200_2011"),
        ("ucf101", "ROOT/train/<ActionName>"),
        ("fashion_mnist", "dataset-fashion-mnist"),
    ],
)
def test_missing_folder_says_what_to_put_where(name: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"Nothing is downloaded|apt-get") as info:
        get_dataset(name, root=str(tmp_path / "absent"))
    assert expected in str(info.value)
    assert not (tmp_path / "absent").exists()


def test_cifar100_python_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = ["apple", "aquarium_fish", "baby"]
    with (folder / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": []}, f)
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with (folder / split).open("wb") as f:
            pickle.dump({"data": data, "fine_labels": [i % 3 for i in range(n)]}, f)
    dataset = get_dataset("cifar100", root=str(tmp_path))
    assert dataset.class_names == ["apple", "aquarium fish", "baby"]
    assert dataset.train.labels.tolist() == [0, 1, 2, 0, 1, 2]
    image = np.asarray(dataset.test.images[1])
    assert image.shape == (32, 32, 3)
    with (folder / "test").open("rb") as f:
        raw = pickle.load(f)["data"][1]
    # CIFAR rows are channel-major: R plane, then G, then B.
    assert image[0, 1].tolist() == [raw[1], raw[1024 + 1], raw[2048 + 1]]


def test_fashion_mnist_from_the_debian_package() -> None:
    dataset = get_dataset("fashion_mnist")
    assert dataset.n_classes == 10 and len(dataset.train) == 60_000 and len(dataset.test) == 10_000
    assert isinstance(dataset.test.images, ArrayImages)
    plain = get_dataset("fashion_mnist", invert=False)
    first = np.asarray(dataset.test.images[0])[..., 0]
    assert np.array_equal(first, 255 - np.asarray(plain.test.images[0])[..., 0])
    assert dataset.fingerprint != plain.fingerprint


def test_lazy_image_sequences() -> None:
    images = ArrayImages(np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2))
    assert len(images[1:3]) == 2 and np.asarray(images[-1])[0, 0, 0] == 12
    with pytest.raises(IndexError):
        images[4]
    both = ConcatImages([images.subset([0, 1]), images.subset([3])])
    assert len(both) == 3 and np.asarray(both[2])[0, 0, 0] == 12
    assert np.asarray(both.subset([2, 0])[0])[0, 0, 0] == 12
