"""Time one task update of the tiny models on this machine, with METHOD.md's default schedule.

    .venv/bin/python bench/update_time.py [--images-per-class 50] [--device cpu]

Learns a first task (2 classes), then times the second (2 new classes: DMC-OT calibrates
and replays), and prints seconds per phase for each model family and method.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from dmc_core.backbone import BackboneSpec, load_backbone, save_checkpoint
from dmc_core.config import LearnerConfig
from dmc_core.learner import Learner
from tests.core.toy import colour_images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images-per-class", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("dmc-tiny-vit", "dmc-tiny-cnn-bert"):
            torch.manual_seed(0)
            checkpoint = Path(tmp) / f"{family}.pt"
            save_checkpoint(load_backbone(family).model, checkpoint)
            spec = BackboneSpec(family, checkpoint=str(checkpoint))
            for method in ("dmc", "dmc_ot"):
                config = LearnerConfig(method=method, device=args.device)  # type: ignore[arg-type]
                learner = Learner(load_backbone(spec, device=args.device), config)
                images, labels = colour_images([0, 1], args.images_per_class, seed=0)
                learner.learn_task(images, labels, ["red", "green"])
                images, labels = colour_images([2, 3], args.images_per_class, seed=1)
                start = time.perf_counter()
                report = learner.learn_task(images, labels, ["blue", "yellow"])
                total = time.perf_counter() - start
                phases = ", ".join(f"{k} {v:.2f}s" for k, v in report.seconds.items())
                print(f"{family:18} {method:7} second task: {total:.2f}s ({phases})")


if __name__ == "__main__":
    main()
