"""Peak memory of decoding one predict request's images (`server.images.prepare_batch`,
with the tiny model's preprocessing), run as its own process so that the peak is this
request's alone: `python -m tests.server.predict_memory IMAGE... [--max-side N]
[--max-aspect-ratio R] [--max-total-pixels P]` prints `{"peak_mib": ..., "outcome": ...}`
(outcome: the input tensor's shape, or the refusal's status code)."""

from __future__ import annotations

import argparse
import io
import json
import resource
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from dmc_core.backbone import load_backbone
from server.errors import UploadError
from server.images import ImageLimits, prepare_batch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--max-aspect-ratio", type=float, default=20.0)
    parser.add_argument("--max-total-pixels", type=int, default=10**12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preprocess = load_backbone("dmc-tiny-vit").preprocess_val

    def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([preprocess(image) for image in images])

    limits = ImageLimits(40_000_000, args.max_aspect_ratio)

    def run(files: list[tuple[str, bytes]]) -> torch.Tensor:
        return prepare_batch(
            files,
            limits,
            max_side=args.max_side,
            max_total_pixels=args.max_total_pixels,
            to_tensor=to_tensor,
        )

    small = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(small, format="PNG")
    run([("warm-up", small.getvalue())])  # allocators and lazy imports, before the baseline
    files = [(path.name, path.read_bytes()) for path in args.images]
    before = peak_mib()
    outcome: object
    try:
        outcome = list(run(files).shape)
    except UploadError as exc:
        outcome = exc.status_code
    print(json.dumps({"peak_mib": round(peak_mib() - before, 1), "outcome": outcome}))


if __name__ == "__main__":
    main()
