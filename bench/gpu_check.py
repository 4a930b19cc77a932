"""The GPU path, checked in one run (issue 19).

    .venv/bin/python bench/gpu_check.py                 # a GPU: ViT-B-16, under 5 minutes
    .venv/bin/python bench/gpu_check.py --small         # the CPU: the tiny ViT, seconds

Learns two tasks of synthetic class images (`bench/scale.py`'s: 50 classes x 100 images
at 224 px on a GPU, with ViT-B-16 at random weights saved as a checkpoint, in bf16; the
tiny ViT, 5 classes x 8 images at 32 px and one epoch per stage with `--small`), then
prints:

- seconds per phase of the second task (the learner's TaskReport) and peak memory (the
  GPU's allocator, and this process's resident memory);
- host-device syncs per stage-1 and stage-2 step of the second task, counted with
  `torch.cuda.set_sync_debug_mode` on a GPU and, on the CPU, by counting the operations
  that would wait for the device there (`SYNC_OPS`: reading a value to the host, and
  operations whose output size depends on the data); `.tolist()` and `.numpy()` of CPU
  tensors dispatch no operation, so the CPU count misses those;
- whether a save / load round trip predicts bit-identically;
- predict images per second at batch 32 and 256 (the inference part, merged adapter, as
  a server replica predicts: uint8 pixels in, normalised on the device);
- stage-2 milliseconds per step at 1,000 classes (`--stage2-classes`) in bf16 and fp32.

`make test` runs `--small` (tests/test_gpu_check.py), so the script never goes stale.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.utils._python_dispatch import TorchDispatchMode

from bench.scale import parse_overrides, task_data
from dmc_core.backbone import BackboneSpec, load_backbone, save_checkpoint
from dmc_core.config import LearnerConfig
from dmc_core.learner import Learner
from dmc_core.state import load_state, save_state

# Operations that make the host wait for a GPU: a value read to the host, and outputs
# whose size depends on the data.
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::item",
        "aten::nonzero",
        "aten::masked_select",
        "aten::unique_consecutive",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::bincount",
    }
)


@dataclass(frozen=True)
class Size:
    model: str
    image_size: int
    classes_per_task: int
    images_per_class: int
    overrides: dict[str, Any] = field(default_factory=dict)


GPU = Size("ViT-B-16", 224, 50, 100)
SMALL = Size(
    "dmc-tiny-vit",
    32,
    5,
    8,
    {
        "stage1.epochs": 1,
        "stage1.batch_size": 8,
        "stage2.epochs": 2,
        "stage2.batch_size": 16,
        # The augmentation's random crop reads host tensors: in a worker, off the count.
        "loader_workers": 1,
    },
)


class _CountSyncs(TorchDispatchMode):
    """Counts `SYNC_OPS`, except inside an optimizer's step: its step counters are host
    tensors on a GPU too (not capturable), so reading them waits for nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func._schema.name in SYNC_OPS and not self.paused:
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> _CountSyncs:
        def pause(*_: Any) -> None:
            self.paused = True

        def resume(*_: Any) -> None:
            self.paused = False

        self._hooks = [
            register_optimizer_step_pre_hook(pause),
            register_optimizer_step_post_hook(resume),
        ]
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)


class SyncCounter:
    """Host-device syncs so far: the CUDA sync debug mode's warnings on a GPU, the
    dispatched `SYNC_OPS` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu = _CountSyncs()
        self._warnings: list[warnings.WarningMessage] = []

    @property
    def count(self) -> int:
        if self.device.type == "cuda":
            return sum("synchronizing" in str(w.message) for w in self._warnings)
        return self._cpu.count

    @contextlib.contextmanager
    def counting(self) -> Iterator[SyncCounter]:
        if self.device.type != "cuda":
            with self._cpu:
                yield self
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield self
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self._warnings = caught


class StepSyncs:
    """A progress callback that records the sync count at every step of every stage."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter
        self.marks: dict[str, list[int]] = {}

    def __call__(self, stage: str, step: int, total: int) -> None:
        self.marks.setdefault(stage, []).append(self.counter.count)

    def per_step(self, stage: str) -> float | None:
        """Syncs between the stage's first and last step, per step (epoch setups included)."""
        marks = self.marks.get(stage, [])
        if len(marks) < 2:
            return None
        return (marks[-1] - marks[0]) / (len(marks) - 1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def predict_rate(learner: Learner, images: Sequence[Any], batch: int, repeats: int) -> float:
    """Images per second of `learner.predict` on uint8 batches of `batch` images."""
    pixels = learner.preprocess([images[i % len(images)] for i in range(batch)])
    learner.predict(pixels)  # warm-up
    synchronize(learner.device)
    start = time.perf_counter()
    for _ in range(repeats):
        learner.predict(pixels)
    synchronize(learner.device)
    return batch * repeats / (time.perf_counter() - start)


def stage2_ms_per_step(
    spec: BackboneSpec, config: LearnerConfig, n_classes: int, precision: str, steps: int
) -> float:
    """One stage-2 epoch of `steps` steps over `n_classes` classes (10 tasks; the text tower
    runs over every class's prompt each step), in milliseconds per step after the first."""
    config = config.with_overrides({"precision": precision, "stage2.epochs": 1})
    learner = Learner(load_backbone(spec, device=config.device), config)
    per_task = n_classes // 10
    names = [f"class {c}" for c in range(n_classes)]
    learner.prompts.restore_classes(
        names[:-per_task], [c // per_task for c in range(n_classes)][:-per_task]
    )
    learner.prompts.add_task(names[-per_task:])
    n = steps * config.stage2.batch_size
    width = learner.prompts().shape[-1]
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, width, generator=generator)
    labels = torch.arange(n) % per_task + (n_classes - per_task)
    times: list[float] = []

    def mark(stage: str, step: int, total: int) -> None:
        synchronize(learner.device)
        times.append(time.perf_counter())

    learner._stage2(features, labels, generator, mark)
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the tiny ViT on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    parser.add_argument("--stage2-classes", type=int, default=None, help="1000; 200 --small")
    parser.add_argument("--stage2-steps", type=int, default=None, help="10; 3 --small")
    parser.add_argument("--predict-repeats", type=int, default=None, help="20; 2 --small")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="LearnerConfig overrides"
    )
    args = parser.parse_args(argv)
    size = SMALL if args.small else GPU
    device = torch.device(args.device or ("cpu" if args.small else "cuda"))
    stage2_classes = args.stage2_classes or (200 if args.small else 1000)
    stage2_steps = args.stage2_steps or (3 if args.small else 10)
    repeats = args.predict_repeats or (2 if args.small else 20)
    precision = "fp32" if device.type == "cpu" else "bf16"
    results: dict[str, Any] = {"device": str(device), "model": size.model, "precision": precision}
    print(f"device {device}, model {size.model}, {precision}, torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        checkpoint = Path(tmp) / "backbone.pt"
        save_checkpoint(load_backbone(size.model).model, checkpoint)
        spec = BackboneSpec(size.model, checkpoint=str(checkpoint))
        config = LearnerConfig(device=str(device), precision=precision).with_overrides(
            {**size.overrides, **parse_overrides(args.set)}
        )
        learner = Learner(load_backbone(spec, device=device), config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter = SyncCounter(device)
        reports = []
        for task in range(2):
            first = task * size.classes_per_task
            images, labels = task_data(
                first, size.classes_per_task, size.images_per_class, size.image_size
            )
            names = [f"class {c}" for c in range(first, first + size.classes_per_task)]
            steps = StepSyncs(counter)
            with counter.counting():
                reports.append(learner.learn_task(images, labels, names, progress=steps))
        results["seconds"] = {k: round(v, 3) for k, v in reports[-1].seconds.items()}
        results["peak_memory"] = peak_memory(device)
        results["syncs_per_step"] = {s: steps.per_step(s) for s in ("stage1", "stage2")}
        print("second task, seconds per phase:", results["seconds"])
        print("peak memory (MiB):", {k: round(v) for k, v in results["peak_memory"].items()})
        print("host-device syncs per step of the second task:", results["syncs_per_step"])

        folder = Path(tmp) / "state"
        save_state(learner, folder)
        restored = load_state(folder, device=str(device))
        pixels = learner.preprocess(images[:16])
        results["round_trip_identical"] = torch.equal(
            learner.logits(pixels), restored.logits(pixels)
        )
        print("save / load round trip bit-identical:", results["round_trip_identical"])

        replica = load_state(folder, part="inference", device=str(device))
        replica.merge_for_inference()
        rates = {}
        for batch in (32, 256):
            replica.config.feature_batch_size = batch
            rates[batch] = round(predict_rate(replica, images, batch, repeats), 1)
        results["predict_images_per_second"] = rates
        print("predict images/s by batch size:", rates)

        ms = {}
        for mode in ("bf16", "fp32"):
            ms[mode] = round(
                stage2_ms_per_step(spec, config, stage2_classes, mode, stage2_steps), 2
            )
        results["stage2_ms_per_step"] = {"classes": stage2_classes, **ms}
        print(f"stage-2 ms per step at {stage2_classes} classes:", ms)
    return results


if __name__ == "__main__":
    main()
