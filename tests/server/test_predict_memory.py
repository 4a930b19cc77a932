"""Issue 14 (1): the memory of a predict request is bounded whatever its images. Peaks are
measured in a subprocess (`tests.server.predict_memory`), with wide margins: before the
bounds, the 300,000 x 1 image added about 1.6 GiB and sixteen 4,000 x 4,000 PNGs 1.1 GiB."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from server.images import ImageLimits, decode_image, prepare_batch
from tests.server.conftest import png
from tests.server.test_uploads import refused


def peak(*args: str | Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.server.predict_memory", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_an_extreme_aspect_ratio_is_refused_before_decoding(tmp_path: Path) -> None:
    wide = tmp_path / "wide.png"
    Image.new("RGB", (300_000, 1), (10, 20, 30)).save(wide)
    assert wide.stat().st_size < 2000
    result = peak(wide)
    assert result["outcome"] == 422
    assert result["peak_mib"] < 100, result


def test_sixteen_large_images_are_decoded_one_at_a_time_and_reduced(tmp_path: Path) -> None:
    large = tmp_path / "large.png"
    Image.new("RGB", (4000, 4000), "navy").save(large)
    result = peak(*[large] * 16, "--max-side", "512")
    assert result["outcome"] == [16, 3, 32, 32]
    # One decoded 4,000 x 4,000 RGB image is 46 MiB; all sixteen at once would be 730.
    assert result["peak_mib"] < 400, result


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.tensor(image.size, dtype=torch.float32) for image in images])


def test_the_pixels_of_one_request_are_capped_before_decoding() -> None:
    image = png(Image.new("RGB", (300, 200)))
    limits = ImageLimits(1_000_000, 20.0)
    sizes = prepare_batch(
        [("a", image), ("b", image)],
        limits,
        max_side=0,
        max_total_pixels=120_000,
        to_tensor=to_tensor,
    )
    assert sizes.tolist() == [[300.0, 200.0], [300.0, 200.0]]
    with refused(422, "DMC_MAX_PREDICT_PIXELS"):
        prepare_batch(
            [("a", image), ("b", image), ("c", image)],
            limits,
            max_side=0,
            max_total_pixels=120_000,
            to_tensor=to_tensor,
        )


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "I;16"])
def test_large_images_are_shrunk_to_the_max_side_in_any_mode(mode: str) -> None:
    data = png(Image.new(mode, (1200, 300)))
    image = decode_image(data, "a", ImageLimits(10_000_000, 20.0), max_side=64)
    assert image.mode == "RGB" and image.size == (64, 16)


def test_the_aspect_ratio_limit_is_a_setting() -> None:
    data = png(Image.new("RGB", (2100, 100)))
    with refused(422, "DMC_MAX_IMAGE_ASPECT_RATIO"):
        decode_image(data, "a", ImageLimits(10_000_000, 20.0))
    assert decode_image(data, "a", ImageLimits(10_000_000, 0.0), max_side=64).size == (64, 3)
