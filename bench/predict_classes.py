"""Predict latency of a serving replica at 10 and at 1,000 classes, same run.

    .venv/bin/python bench/predict_classes.py [--model dmc-tiny-vit] [--image-size N]
        [--cache-dir DIR] [--classes 10 1000] [--runs 200] [--rounds 3] [--device cpu]

For each class count, builds a state of that many classes in tasks of 10 (prompts and
Gaussian statistics of random features: learning does not change what a prediction
costs), saves it, and loads it as an API replica does, `load_state(folder,
part="inference")`: adapter, prompts and the cached class prototypes, never the memory;
the adapter is merged. Then times `logits` on one image (one image-encoder pass and one
matmul against the prototypes) `--runs` times per round, alternating the class counts
over `--rounds` rounds, and prints per class count the inference-part bytes, the
replica's load time and the p50 latency, and the p50 ratio to the smallest class count.
Target (issue 12): at most 1.2x at 1,000 classes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dmc_core.backbone import BackboneSpec, load_backbone  # noqa: E402
from dmc_core.config import LearnerConfig  # noqa: E402
from dmc_core.learner import Learner  # noqa: E402
from dmc_core.state import load_state, save_state  # noqa: E402
from dmc_core.state_files import files_of_part  # noqa: E402

TASK_SIZE = 10


def build_state(spec: BackboneSpec, classes: int, args: argparse.Namespace, folder: Path) -> int:
    """Save a state of `classes` classes; returns its inference-part bytes."""
    torch.manual_seed(0)
    backbone = load_backbone(spec, device=args.device, cache_dir=args.cache_dir)
    learner = Learner(backbone, LearnerConfig(device=args.device))
    blank = learner.preprocess([Image.new("RGB", (32, 32))])
    dim = learner.encode_images(blank).shape[1]
    for first in range(0, classes, TASK_SIZE):
        names = [f"class {i}" for i in range(first, min(first + TASK_SIZE, classes))]
        learner.prompts.add_task(names)
        for i in range(len(names)):
            learner.memory.add_class(first + i, torch.randn(2 * dim, dim))
    manifest = save_state(learner, folder)
    return sum((folder / name).stat().st_size for name in files_of_part(manifest, "inference"))


def p50_ms(replica: Learner, pixels: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        replica.logits(pixels)
        if replica.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dmc-tiny-vit")
    parser.add_argument("--image-size", type=int, help="input size (e.g. 64 for the stand-in)")
    parser.add_argument("--cache-dir", type=Path, help="where the stand-in is built")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = BackboneSpec(args.model, image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="dmc-predict-classes-") as tmp:
        replicas: dict[int, Learner] = {}
        for n in args.classes:
            folder = Path(tmp) / f"state-{n}"
            inference_bytes = build_state(spec, n, args, folder)
            started = time.perf_counter()
            replica = load_state(
                folder, part="inference", device=args.device, cache_dir=args.cache_dir
            )
            replica.merge_for_inference()
            load_s = time.perf_counter() - started
            replicas[n] = replica
            print(f"{n:>5} classes: inference part {inference_bytes} bytes, load {load_s:.2f}s")
        first = replicas[args.classes[0]]
        pixels = first.preprocess([Image.effect_noise((224, 224), 64).convert("RGB")])
        latencies: dict[int, list[float]] = {n: [] for n in args.classes}
        for replica in replicas.values():
            p50_ms(replica, pixels, 10)  # warm-up
        for _ in range(args.rounds):
            for n, replica in replicas.items():
                latencies[n].append(p50_ms(replica, pixels, args.runs))
    base = statistics.median(latencies[args.classes[0]])
    print(f"\np50 predict latency, one image, {args.model} on {args.device}:")
    for n in args.classes:
        p50 = statistics.median(latencies[n])
        print(f"{n:>5} classes: {p50:.3f} ms  ({p50 / base:.2f}x of {args.classes[0]} classes)")


if __name__ == "__main__":
    main()
