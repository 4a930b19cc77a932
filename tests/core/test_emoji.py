"""The emoji dataset: pinned npm tarballs (integrity), the build from them, the class list,
licences in the identity, and the leave-one-style-out split.

The build tests use tiny tarballs made here (no network: a tarball already in the cache is
only checked). The class-list tests read the real build that `make datasets` (part of
`make test`) writes to $DMC_TEST_DATASETS/emoji; without that variable they are skipped
when it is missing.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dmc_cli.main import app
from dmc_core.data.emoji import EMOJI_STYLES, EmojiStyle, build_emoji, load_emoji
from dmc_core.data.images import ClassificationDataset, PathImages
from dmc_core.data.npm import IntegrityError, NpmPackage, fetch_tarball, integrity_of
from dmc_core.data.registry import DatasetError, fetch_dataset, get_dataset

# (name, unified, non_qualified, category, image); "HAPPY FACE" is outside the five
# categories, "UMBRELLA" has only a non-qualified OpenMoji file, "ROCKET" no Fluent one.
ENTRIES = [
    ("ABACUS", "1F9EE", None, "Objects", "1f9ee.png"),
    ("HOT PEPPER", "1F336-FE0F", "1F336", "Food & Drink", "1f336-fe0f.png"),
    ("UMBRELLA", "2602-FE0F", "2602", "Travel & Places", "2602-fe0f.png"),
    ("ROCKET", "1F680", None, "Travel & Places", "1f680.png"),
    ("HAPPY FACE", "1F600", None, "Smileys & Emotion", "1f600.png"),
]
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
    '<circle cx="36" cy="36" r="30" fill="{colour}"/></svg>'
)


def _bitmap(colour: tuple[int, int, int], size: int, fmt: str) -> bytes:
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    image.paste((*colour, 255), (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    data = io.BytesIO()
    image.save(data, format=fmt)
    return data.getvalue()


def _tarball(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _fake_styles(cache: Path) -> dict[str, EmojiStyle]:
    """The real styles' file layouts in tiny tarballs put in the cache, pinned to their
    actual integrity (so nothing is fetched)."""
    emoji_json = [
        {"name": n, "unified": u, "non_qualified": q, "category": c, "image": i, "sort_order": k}
        for k, (n, u, q, c, i) in enumerate(ENTRIES)
    ]
    contents = {
        "google": {
            "package/emoji.json": json.dumps(emoji_json).encode(),
            **{f"package/img/google/64/{e[4]}": _bitmap((200, 0, 0), 64, "PNG") for e in ENTRIES},
        },
        "openmoji": {
            f"package/color/svg/{e[2] or e[1]}.svg": SVG.format(colour="#00aa00").encode()
            for e in ENTRIES
        },
        "fluent3d": {
            f"package/assets/{e[1].lower()}.webp": _bitmap((0, 0, 200), 256, "WEBP")
            for e in ENTRIES
            if e[0] != "ROCKET"
        },
    }
    cache.mkdir(parents=True)
    styles = {}
    for name, files in contents.items():
        staged = cache / f"{name}.tgz"
        _tarball(staged, files)
        package = NpmPackage(f"fake-{name}", "0.0.1", integrity_of(staged))
        staged.rename(cache / package.filename)
        styles[name] = dataclasses.replace(EMOJI_STYLES[name], package=package)
    return styles


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, EmojiStyle]]:
    root = tmp_path_factory.mktemp("emoji")
    styles = _fake_styles(root / "npm")
    build_emoji(root, 24, styles=styles, show_progress=False)
    return root, styles


def _style_of(path: str) -> str:
    return Path(path).parent.name


def _check_leave_one_style_out(dataset: ClassificationDataset, test_style: str) -> None:
    train, test = dataset.train.images, dataset.test.images
    assert isinstance(train, PathImages) and isinstance(test, PathImages)
    train_styles = {_style_of(p) for p in train.paths}
    assert test_style not in train_styles
    assert train_styles == set(dataset.identity["train_styles"])
    assert {_style_of(p) for p in test.paths} == {test_style}
    # every class: one image per train style, one test image
    assert np.array_equal(
        np.bincount(dataset.train.labels), [len(train_styles)] * dataset.n_classes
    )
    assert np.array_equal(np.bincount(dataset.test.labels), [1] * dataset.n_classes)


def test_build_keeps_the_emoji_of_every_style_on_white(
    small_build: tuple[Path, dict[str, EmojiStyle]],
) -> None:
    root, _ = small_build
    dataset = load_emoji(root, 24, test_style="openmoji")
    # HAPPY FACE is another category, ROCKET has no Fluent image; UMBRELLA is found by its
    # non-qualified OpenMoji file name
    assert dataset.class_names == ["abacus", "hot pepper", "umbrella"]
    without_fluent = load_emoji(root, 24, test_style="openmoji", styles=["google", "openmoji"])
    assert without_fluent.class_names == ["abacus", "hot pepper", "umbrella", "rocket"]
    image = dataset.test.images[0]
    assert image.mode == "RGB" and image.size == (24, 24)
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent corner -> white
    assert pixels[12, 12, 1] > 100 and pixels[12, 12, 0] < 50  # the rendered green circle


@pytest.mark.parametrize("test_style", ["google", "openmoji", "fluent3d"])
def test_split_never_puts_the_test_style_in_train(
    small_build: tuple[Path, dict[str, EmojiStyle]], test_style: str
) -> None:
    root, _ = small_build
    _check_leave_one_style_out(load_emoji(root, 24, test_style=test_style), test_style)


def test_identity_records_packages_and_licences(
    small_build: tuple[Path, dict[str, EmojiStyle]],
) -> None:
    root, styles = small_build
    a = load_emoji(root, 24, test_style="openmoji")
    assert a.identity["licences"] == {
        "google": "Apache-2.0",
        "openmoji": "CC-BY-SA-4.0",
        "fluent3d": "MIT",
    }
    assert a.identity["styles"]["openmoji"]["integrity"] == styles["openmoji"].package.integrity
    assert a.fingerprint != load_emoji(root, 24, test_style="google").fingerprint


def test_bad_options_are_refused(small_build: tuple[Path, dict[str, EmojiStyle]]) -> None:
    root, _ = small_build
    with pytest.raises(DatasetError, match="test_style 'twitter' is not among"):
        load_emoji(root, 24, test_style="twitter")
    with pytest.raises(DatasetError, match="at least two styles"):
        load_emoji(root, 24, test_style="google", styles=["google"])
    with pytest.raises(DatasetError, match="dmc datasets fetch emoji"):
        load_emoji(root, 32)


def test_integrity_mismatch_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "emoji"
    styles = _fake_styles(root / "npm")
    tarball = root / "npm" / styles["openmoji"].package.filename
    tarball.write_bytes(tarball.read_bytes()[:-1] + b"x")  # one byte changed
    with pytest.raises(IntegrityError, match=r"fake-openmoji@0.0.1.*pinned"):
        build_emoji(root, 24, styles=styles, show_progress=False)
    assert not tarball.exists()  # refused and removed, so the next fetch starts clean
    assert not (root / "24px").exists()
    # an intact tarball passes without any download
    google = styles["google"].package
    assert fetch_tarball(google, root / "npm") == root / "npm" / google.filename


def test_fetch_step_by_name() -> None:
    with pytest.raises(DatasetError, match="nothing to fetch; fetchable: emoji"):
        fetch_dataset("fashion_mnist")
    result = CliRunner().invoke(app, ["datasets", "fetch", "emoji", "-o", "colour=1"])
    assert result.exit_code == 2 and "no option(s) ['colour']" in result.output


# ------------------------------------------------------------ the real build
@pytest.fixture(scope="module")
def emoji_root() -> Path:
    env = os.environ.get("DMC_TEST_DATASETS")
    root = Path(env or ".cache/datasets") / "emoji"
    if not (root / "64px" / "manifest.json").is_file():
        message = f"no emoji build in {root}: run `make datasets`"
        if env:
            pytest.fail(message)
        pytest.skip(message)
    return root


def test_class_list(emoji_root: Path) -> None:
    dataset = get_dataset("emoji", root=str(emoji_root))
    # the five categories' emoji that all four styles draw (OpenMoji names some files
    # by the non-qualified code point)
    assert dataset.n_classes == 849
    assert {"abacus", "hot pepper", "sailboat", "cat", "teapot"} <= set(dataset.class_names)
    assert all(name == name.lower() for name in dataset.class_names)
    assert dataset.identity["licences"] == {
        "google": "Apache-2.0",
        "twitter": "CC-BY-4.0",
        "openmoji": "CC-BY-SA-4.0",
        "fluent3d": "MIT",
    }
    for style, described in dataset.identity["styles"].items():
        assert described["integrity"] == EMOJI_STYLES[style].package.integrity
    _check_leave_one_style_out(dataset, "openmoji")


def test_every_style_held_out_on_the_real_build(emoji_root: Path) -> None:
    for style in EMOJI_STYLES:
        dataset = get_dataset("emoji", root=str(emoji_root), test_style=style)
        _check_leave_one_style_out(dataset, style)
        assert len(dataset.train) == 3 * dataset.n_classes
