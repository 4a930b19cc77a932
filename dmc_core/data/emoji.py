"""Named emoji drawn by several vendors (styles), from pinned npm packages.

The same class ("abacus", "hot pepper", "sailboat") exists in every style, drawn
independently, so a style is a domain: the split is leave-one-style-out (train on the other
styles, test on the held-out one, `test_style`).

`build_emoji` (run by `dmc datasets fetch emoji`) fetches the packages (`dmc_core.data.npm`:
`npm pack`, pinned sha512 integrity), takes each emoji of the five object-like categories
from every tarball, composites it on white at `image_size` px and writes

```
ROOT/npm/*.tgz                     the checked tarballs
ROOT/<size>px/<style>/<code>.png   one image per emoji and style
ROOT/<size>px/classes.json         every candidate emoji: name, code, category, its styles
ROOT/<size>px/manifest.json        the packages, integrity strings and licences (written last)
```

`load_emoji` reads that folder only. Classes are the candidates present in every style
used; names are emoji.json's, lower-cased.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dmc_core.backbone import DEFAULT_CACHE_DIR
from dmc_core.data.images import ClassificationDataset, PathImages, Split
from dmc_core.data.npm import NpmPackage, fetch_tarball
from dmc_core.data.registry import DatasetError

__all__ = [
    "CATEGORIES",
    "EMOJI_DEFAULT_ROOT",
    "EMOJI_STYLES",
    "EmojiStyle",
    "build_emoji",
    "load_emoji",
]

EMOJI_DEFAULT_ROOT = DEFAULT_CACHE_DIR / "datasets" / "emoji"
CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Objects", "Activities")
CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.json"
FETCH_HINT = "build it with `dmc datasets fetch emoji` (make datasets)"

Entry = dict[str, Any]  # one record of emoji.json


def _decode_bitmap(data: bytes, size: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        rgba = image.convert("RGBA")
    if rgba.size != (size, size):
        rgba = rgba.resize((size, size), Image.Resampling.LANCZOS)
    return rgba


def _decode_svg(data: bytes, size: int) -> Image.Image:
    try:
        import cairosvg
    except ImportError as error:  # also when the cairo library itself is missing
        raise DatasetError(
            f"rendering SVG emoji needs cairosvg and the cairo library: {error}"
        ) from error
    png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    return _decode_bitmap(png, size)


def _codes(entry: Entry) -> list[str]:
    """The emoji's code points as emoji.json spells them: fully qualified first."""
    return [code for code in (entry["unified"], entry.get("non_qualified")) if code]


@dataclass(frozen=True)
class EmojiStyle:
    """One vendor's drawings: where each emoji is in the package, and its licence."""

    package: NpmPackage
    licence: str  # of the artwork (SPDX)
    artwork: str
    members: Callable[[Entry], list[str]]  # candidate paths in the tarball, first found wins
    decode: Callable[[bytes, int], Image.Image]  # file bytes, size -> RGBA image


def _datasource(vendor: str) -> Callable[[Entry], list[str]]:
    return lambda entry: [f"package/img/{vendor}/64/{entry['image']}"]


EMOJI_STYLES: dict[str, EmojiStyle] = {
    "google": EmojiStyle(
        NpmPackage(
            "emoji-datasource-google",
            "16.0.0",
            "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        ),
        "Apache-2.0",
        "Noto Emoji (Google), 64 px PNG",
        _datasource("google"),
        _decode_bitmap,
    ),
    "twitter": EmojiStyle(
        NpmPackage(
            "emoji-datasource-twitter",
            "16.0.0",
            "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        ),
        "CC-BY-4.0",
        "Twemoji (Twitter), 64 px PNG",
        _datasource("twitter"),
        _decode_bitmap,
    ),
    "openmoji": EmojiStyle(
        NpmPackage(
            "openmoji",
            "17.0.0",
            "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
        ),
        "CC-BY-SA-4.0",
        "OpenMoji, colour SVG rendered with cairosvg",
        lambda entry: [f"package/color/svg/{code}.svg" for code in _codes(entry)],
        _decode_svg,
    ),
    "fluent3d": EmojiStyle(
        NpmPackage(
            "@lobehub/fluent-emoji-3d",
            "1.1.0",
            "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
        ),
        "MIT",
        "Fluent Emoji 3D (Microsoft), 256 px WebP",
        lambda entry: [f"package/assets/{code.lower()}.webp" for code in _codes(entry)],
        _decode_bitmap,
    ),
}
# emoji.json (names, categories, image files) ships in the emoji-datasource packages.
CATALOGUE_STYLE = "google"
CATALOGUE_MEMBER = "package/emoji.json"


def _on_white(image: Image.Image) -> Image.Image:
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")


def _read_member(tarball: Path, member: str) -> bytes:
    with tarfile.open(tarball, "r:gz") as archive:
        file = archive.extractfile(member)
        if file is None:
            raise DatasetError(f"{tarball.name} has no file {member}")
        return file.read()


def _candidates(tarball: Path) -> list[Entry]:
    entries: list[Entry] = json.loads(_read_member(tarball, CATALOGUE_MEMBER))
    chosen = [e for e in entries if e["category"] in CATEGORIES and e.get("name")]
    return sorted(chosen, key=lambda e: int(e["sort_order"]))


def _render_style(
    style: EmojiStyle,
    tarball: Path,
    entries: Sequence[Entry],
    folder: Path,
    image_size: int,
    bar: tqdm[Any],
) -> set[str]:
    """Write the style's image of every entry it has; returns their codes (`unified`)."""
    wanted = {member for entry in entries for member in style.members(entry)}
    files: dict[str, bytes] = {}  # small images: one pass over the tarball, read them all
    with tarfile.open(tarball, "r:gz") as archive:
        for info in archive:
            if info.name in wanted and info.isfile():
                file = archive.extractfile(info)
                assert file is not None
                files[info.name] = file.read()
    folder.mkdir(parents=True)
    found = set()
    for entry in entries:
        member = next((m for m in style.members(entry) if m in files), None)
        if member is not None:
            image = _on_white(style.decode(files[member], image_size))
            image.save(folder / f"{entry['unified']}.png", optimize=True)
            found.add(entry["unified"])
        bar.update(1)
    return found


def build_emoji(
    root: str | Path = EMOJI_DEFAULT_ROOT,
    image_size: int = 64,
    *,
    styles: Mapping[str, EmojiStyle] = EMOJI_STYLES,
    show_progress: bool = True,
) -> Path:
    """Fetch the packages and render every style at `image_size` px into ROOT/<size>px/
    (atomically: a half-built folder never looks built). Returns that folder; an existing
    complete build is kept."""
    root = Path(root).expanduser()
    if image_size < 8:
        raise DatasetError(f"emoji: image_size must be at least 8, got {image_size}")
    out = root / f"{image_size}px"
    if (out / MANIFEST_FILE).is_file():
        return out
    tarballs = {name: fetch_tarball(style.package, root / "npm") for name, style in styles.items()}
    entries = _candidates(tarballs[CATALOGUE_STYLE])
    scratch = root / f".build-{image_size}px"
    shutil.rmtree(scratch, ignore_errors=True)
    have: dict[str, set[str]] = {}
    with tqdm(
        total=len(entries) * len(styles), unit="img", disable=not show_progress, leave=False
    ) as bar:
        for name, style in styles.items():
            bar.set_description(f"emoji {name}")
            have[name] = _render_style(
                style, tarballs[name], entries, scratch / name, image_size, bar
            )
    classes = [
        {
            "name": str(e["name"]).lower(),
            "code": e["unified"],
            "category": e["category"],
            "styles": [name for name in styles if e["unified"] in have[name]],
        }
        for e in entries
    ]
    (scratch / CLASSES_FILE).write_text(json.dumps(classes, indent=1))
    manifest = {
        "image_size": image_size,
        "categories": list(CATEGORIES),
        "styles": {name: _describe(style) for name, style in styles.items()},
    }
    (scratch / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    return out


def _describe(style: EmojiStyle) -> dict[str, str]:
    return {
        "package": style.package.spec,
        "integrity": style.package.integrity,
        "licence": style.licence,
        "artwork": style.artwork,
    }


def load_emoji(
    root: str | Path = EMOJI_DEFAULT_ROOT,
    image_size: int = 64,
    test_style: str = "openmoji",
    styles: Sequence[str] | None = None,
) -> ClassificationDataset:
    """Leave-one-style-out: train on every style in `styles` (default: all built) but
    `test_style`, test on `test_style`. Classes: the emoji present in every style used."""
    folder = Path(root).expanduser() / f"{image_size}px"
    if not (folder / MANIFEST_FILE).is_file():
        raise DatasetError(f"emoji: no built dataset in {folder}; {FETCH_HINT}")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    built: dict[str, dict[str, str]] = manifest["styles"]
    used = list(styles) if styles is not None else list(built)
    unknown = sorted(set(used) - set(built))
    if unknown or len(set(used)) != len(used):
        raise DatasetError(f"emoji: styles {used} must be distinct and among {sorted(built)}")
    if test_style not in used:
        raise DatasetError(f"emoji: test_style {test_style!r} is not among the styles {used}")
    train_styles = [s for s in used if s != test_style]
    if not train_styles:
        raise DatasetError("emoji: leave-one-style-out needs at least two styles")
    classes = [
        c for c in json.loads((folder / CLASSES_FILE).read_text()) if set(used) <= set(c["styles"])
    ]

    def split(split_styles: list[str]) -> Split:
        paths = [str(folder / s / f"{c['code']}.png") for c in classes for s in split_styles]
        labels = np.repeat(np.arange(len(classes)), len(split_styles))
        return Split(PathImages(paths), labels)

    identity = {
        "root": str(folder.resolve()),
        "image_size": image_size,
        "test_style": test_style,
        "train_styles": train_styles,
        "styles": {s: built[s] for s in used},
        "licences": {s: built[s]["licence"] for s in used},
    }
    names = [c["name"] for c in classes]
    return ClassificationDataset("emoji", names, split(train_styles), split([test_style]), identity)
