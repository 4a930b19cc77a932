"""Preprocessing per task, before and after issue 19 (item 5), for a 224 px open_clip model.

    .venv/bin/python bench/preprocess_time.py [--images 500]

Before, DMC-OT ran the test transform (resize, crop, ToTensor, Normalize: float32) over a
task's images twice, once per encoder pass; now it runs its PIL half once, to uint8
(`dmc_core.pixels`), and both passes read those pixels, normalised on the device. Prints
the best of three timings of each on one thread, and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import open_clip
import torch

from bench.scale import task_data
from dmc_core.pixels import split_transform


def best_of_three(work: Callable[[], object]) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transform = open_clip.image_transform(224, is_train=False)
    cut = split_transform(transform)
    images, _ = task_data(0, 10, max(1, args.images // 10), 256)
    before = best_of_three(
        lambda: [torch.stack([transform(image) for image in images]) for _ in range(2)]
    )
    after = best_of_three(lambda: torch.stack([cut.to_uint8(image) for image in images]))
    print(
        f"{len(images)} images, 256 -> 224 px, one thread: test transform twice (float32) "
        f"{before:.2f}s, once to uint8 {after:.2f}s: {before / after:.1f}x; bytes per image "
        f"{3 * 224 * 224 * 4} -> {3 * 224 * 224}"
    )


if __name__ == "__main__":
    main()
