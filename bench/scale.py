"""Cost of learning many classes: one task after another, up to 1,000 classes (issue 12).

    .venv/bin/python bench/scale.py --model dmc-tiny-vit --tasks 100 --classes-per-task 10 \
        --images-per-class 16 --epochs 1 --out bench/results/scale/tiny-1000 [--threads 1]
        [--set stage2.replay=per_class] [--device cuda --precision bf16]

Synthetic class images (deterministic, PIL + numpy): class c is a filled shape (disc,
square, triangle, or a horizontal/vertical/diagonal stripe pattern: c mod 6) in a colour
derived from c, on a background of another colour derived from c, with per-image jitter of
the shape's position and size and Gaussian pixel noise. They measure cost, not accuracy.

After each task it prints and records: classes learned, seconds per phase (the learner's
TaskReport) and the whole update, peak resident memory of this process, the bytes of every
file `save_state` writes (and their total), the bytes of the inference part (the manifest
and the files it marks `inference`; the whole state where the state has no parts), the
time of a fresh `load_state` of the saved folder as a replica does it (the inference part
where there is one, backbone included), and the p50 predict latency of that loaded learner
at the current class count (one image per call, merged adapter, as the server does). At
the end it fits the exponent of update time against learned classes (least squares on
log-log, classes from `--fit-from` on) and writes `results.json` (`tasks`, `fit`),
`time.png` and `bytes.png` into `--out`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from dmc_core.backbone import BackboneSpec, load_backbone, save_checkpoint
from dmc_core.config import LearnerConfig
from dmc_core.experiment.environment import peak_rss_bytes
from dmc_core.learner import Learner
from dmc_core.state import load_state, save_state

SHAPES = ("disc", "square", "triangle", "hstripes", "vstripes", "dstripes")


def class_colours(c: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    rng = np.random.default_rng(1_000_003 * c + 7)
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def class_image(c: int, i: int, size: int) -> Image.Image:
    """Image i of synthetic class c."""
    rng = np.random.default_rng([c, i])
    fg, bg = class_colours(c)
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    shape = SHAPES[c % len(SHAPES)]
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    if shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    else:
        period = max(4, int(size / rng.uniform(4, 8)))
        for k in range(-size, 2 * size, period):
            if shape == "hstripes":
                draw.rectangle((0, k, size, k + period // 2), fill=fg)
            elif shape == "vstripes":
                draw.rectangle((k, 0, k + period // 2, size), fill=fg)
            else:
                draw.line((k, 0, k + size, size), fill=fg, width=period // 2)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def task_data(first: int, n_classes: int, per_class: int, size: int) -> tuple[list[Any], list[int]]:
    images, labels = [], []
    for label in range(n_classes):
        for i in range(per_class):
            images.append(class_image(first + label, i, size))
            labels.append(label)
    return images, labels


def file_sizes(folder: Path) -> dict[str, int]:
    """Bytes of every file of a saved state, by path relative to the folder."""
    return {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def inference_bytes(folder: Path, files: dict[str, int]) -> int:
    """Bytes a serving replica reads: the manifest and the files it marks as the inference
    part; a state without such marks is read whole."""
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = manifest.get("files")
    if not isinstance(parts, dict):
        return sum(files.values())
    wanted = {"manifest.json"} | {n for n, f in parts.items() if f.get("part") == "inference"}
    return sum(size for name, size in files.items() if name in wanted)


def load_replica(folder: Path, device: str, cache_dir: Path) -> Learner:
    """Load a state as a serving replica does: the inference part where states have one."""
    if "part" in inspect.signature(load_state).parameters:
        return load_state(folder, part="inference", device=device, cache_dir=cache_dir)  # type: ignore[call-arg,unused-ignore]
    return load_state(folder, device=device, cache_dir=cache_dir)


def predict_p50(learner: Learner, image: Any, repeats: int) -> float:
    pixels = learner.preprocess([image])
    learner.predict(pixels, top_k=5)  # warm-up: prototypes cached
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        learner.predict(pixels, top_k=5)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    slope, intercept = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)
    return float(slope), float(intercept)


def fit_exponent(tasks: list[dict[str, Any]], from_classes: int) -> dict[str, Any]:
    """Least squares of log(update seconds) on log(classes learned), and per phase."""
    rows = [t for t in tasks if t["classes"] >= from_classes]
    fit: dict[str, Any] = {"from_classes": from_classes, "points": len(rows), "exponent": None}
    if len(rows) >= 2:
        exponent, intercept = _slope([(t["classes"], t["update_seconds"]) for t in rows])
        fit.update(exponent=exponent, log_intercept=intercept, to_classes=rows[-1]["classes"])
        fit["phase_exponents"] = {
            phase: _slope([(t["classes"], max(t["seconds"][phase], 1e-6)) for t in rows])[0]
            for phase in rows[0]["seconds"]
        }
    return fit


def plot(tasks: list[dict[str, Any]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [t["classes"] for t in tasks]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(classes, [t["update_seconds"] for t in tasks], "k-o", ms=3, label="whole update")
    for phase in tasks[0]["seconds"]:
        ax.plot(classes, [t["seconds"].get(phase, 0.0) for t in tasks], "-", label=phase)
    ax.set(xlabel="classes learned", ylabel="seconds per task update", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=120)
    plt.close(fig)

    mib = 1024**2
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.plot(classes, [t["state_bytes"] / mib for t in tasks], "k-o", ms=3, label="saved state")
    left.plot(classes, [t["inference_bytes"] / mib for t in tasks], "-", label="inference part")
    left.set(xlabel="classes learned", ylabel="MiB", title="bytes of the saved state")
    right.plot(classes, [t["peak_rss_bytes"] / mib for t in tasks], "--", label="peak RSS")
    right.set(xlabel="classes learned", ylabel="MiB", title="peak resident memory")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=120)
    plt.close(fig)


def plot_title(run: dict[str, Any]) -> str:
    return (
        f"{run['model']['name']}, {run['config']['method']}, {run['classes_per_task']} classes "
        f"x {run['images_per_class']} images per task"
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default="dmc-tiny-vit",
        help="dmc-tiny-vit, dmc-tiny-cnn-bert (random weights) or lit-effl0-minilm (stand-in)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size; default: 64 for the stand-in, the config's otherwise",
    )
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--classes-per-task", type=int, default=5)
    parser.add_argument("--images-per-class", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=1, help="epochs of stage 1 and stage 2")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="LearnerConfig overrides, e.g. stage2.replay=per_class",
    )
    parser.add_argument("--method", default="dmc_ot")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--predict-repeats", type=int, default=30)
    parser.add_argument("--fit-from", type=int, default=20)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("DMC_TEST_CACHE", "~/.cache/dmc")).expanduser(),
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the plots of --out/results.json"
    )
    args = parser.parse_args()
    if args.plot_only:
        saved = json.loads((args.out / "results.json").read_text())
        plot(saved["tasks"], args.out, plot_title(saved))
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    overrides = {
        "stage1.epochs": args.epochs,
        "stage2.epochs": args.epochs,
        **parse_overrides(args.set),
    }
    config = LearnerConfig(
        method=args.method, device=args.device, precision=args.precision
    ).with_overrides(overrides)

    image_size = args.image_size or (64 if args.model == "lit-effl0-minilm" else None)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.startswith("dmc-tiny"):
            # Random weights saved once, so that every load (the replica's) is the same model.
            torch.manual_seed(0)
            checkpoint = Path(tmp) / f"{args.model}.pt"
            save_checkpoint(load_backbone(args.model).model, checkpoint)
            spec = BackboneSpec(args.model, checkpoint=str(checkpoint), image_size=image_size)
        else:
            spec = BackboneSpec(args.model, image_size=image_size)
        start = time.perf_counter()
        backbone = load_backbone(spec, device=args.device, cache_dir=args.cache_dir)
        backbone_seconds = time.perf_counter() - start
        learner = Learner(backbone, config)
        size = image_size or 64  # the backbone's transform resizes
        probe = class_image(0, 10_000, size)

        run: dict[str, Any] = {
            "command": " ".join(sys.argv),
            "model": spec.to_dict(),
            "threads": args.threads,
            "device": args.device,
            "precision": args.precision,
            "images": "synthetic: per class a shape (c mod 6) and two colours derived from c, "
            "position/size jitter and pixel noise (bench/scale.py class_image)",
            "images_per_class": args.images_per_class,
            "classes_per_task": args.classes_per_task,
            "config": config.to_dict(),
            "backbone_load_seconds": backbone_seconds,
            "tasks": [],
        }
        state_dir = Path(tmp) / "state"
        bar = tqdm(range(args.tasks), desc="tasks", unit="task")
        for task in bar:
            first = task * args.classes_per_task
            images, labels = task_data(first, args.classes_per_task, args.images_per_class, size)
            names = [f"class {first + i}" for i in range(args.classes_per_task)]
            start = time.perf_counter()
            report = learner.learn_task(images, labels, names)
            update_seconds = time.perf_counter() - start

            save_state(learner, state_dir)
            files = file_sizes(state_dir)
            start = time.perf_counter()
            replica = load_replica(state_dir, args.device, args.cache_dir)
            load_seconds = time.perf_counter() - start
            replica.merge_for_inference()
            latency = predict_p50(replica, probe, args.predict_repeats)
            del replica

            state_bytes = sum(files.values())
            replica_bytes = inference_bytes(state_dir, files)
            row: dict[str, Any] = {
                "task": task,
                "classes": len(learner.class_names),
                "update_seconds": update_seconds,
                "seconds": report.seconds,
                "stage2_loss": report.stage2_loss,
                "train_accuracy": report.train_accuracy,
                "peak_rss_bytes": peak_rss_bytes(),
                "files": files,
                "state_bytes": state_bytes,
                "inference_bytes": replica_bytes,
                "load_seconds": load_seconds,
                "predict_p50_seconds": latency,
            }
            run["tasks"].append(row)
            phases = " ".join(f"{k}={v:.2f}" for k, v in report.seconds.items())
            tqdm.write(
                f"classes {row['classes']:5d}  update {update_seconds:7.2f}s ({phases})  "
                f"peak RSS {peak_rss_bytes() / 2**20:7.1f} MiB  "
                f"state {state_bytes / 2**20:8.2f} MiB "
                f"(inference {replica_bytes / 2**20:.2f})  load {load_seconds:.2f}s  "
                f"predict p50 {latency * 1e3:.1f} ms"
            )
            run["fit"] = fit_exponent(run["tasks"], args.fit_from)
            (args.out / "results.json").write_text(json.dumps(run, indent=2) + "\n")

    fit = run["fit"]
    if fit["exponent"] is not None:
        phases = ", ".join(f"{k} {v:.2f}" for k, v in fit["phase_exponents"].items())
        print(
            f"update time ~ classes^{fit['exponent']:.2f} "
            f"({fit['from_classes']} to {fit['to_classes']} classes, {fit['points']} tasks; "
            f"per phase: {phases})"
        )
    else:
        print(f"too few tasks from {args.fit_from} classes on to fit an exponent")
    title = (
        f"{args.model}, {args.classes_per_task} classes x {args.images_per_class} images per task"
    )
    plot(run["tasks"], args.out, title)


if __name__ == "__main__":
    main()
