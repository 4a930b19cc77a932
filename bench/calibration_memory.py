"""Peak memory and time of DMC-OT's Sinkhorn calibration, before and after the budget.

"before" is the implementation on the `main` branch (numpy POT, dense K x n float64
plan, CPU), read with `git show`; "after" is this tree's (blocked log-domain Sinkhorn in
torch within `memory_budget_mib`). Each runs in its own process on the same synthetic
memory (old classes with random covariances, d = 384 as the stand-in's) and the same new
images with a smooth drift, for a fixed number of Sinkhorn iterations (stopping disabled,
so the two do the same work). Peak memory is the growth of the process's peak resident
set during `calibrate` (CPU; glibc's mmap threshold fixed, see `_child`) or torch's peak
allocation (CUDA). Also prints the bytes per
class of the memory: former float64 full, float32 full (Cholesky), low-rank.

    python bench/calibration_memory.py [--classes 200] [--images 2000] [--iterations 20]
        [--device cpu] [--budget-mib 256] [--skip-before]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class _PeakRss:
    """Polls the resident set every few milliseconds (ru_maxrss would include set-up)."""

    def __init__(self) -> None:
        self.peak = _current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _current_rss_bytes())

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_bytes())


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _legacy_state(classes: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    means = 3.0 * torch.randn(classes, d, generator=g, dtype=torch.float64)
    x = torch.randn(classes, 64, d, generator=g, dtype=torch.float64)
    covs = x.transpose(1, 2) @ x / (64 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)
    return {"class_indices": torch.arange(classes), "means": means, "covariances": covs}


def run_one(args: argparse.Namespace) -> None:
    """In a child process: calibrate once, print a JSON line."""
    torch.set_num_threads(args.threads)
    from dmc_core.calibration import SinkhornCalibrator
    from dmc_core.memory import GaussianMemory

    d = 384
    memory = GaussianMemory.from_state_dict(_legacy_state(args.classes, d))
    g = torch.Generator().manual_seed(1)
    a = 3.0 * torch.randn(args.images, d, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.tanh(a @ torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5)
    labels = torch.arange(args.images) % 10
    options = {"num_iter_max": args.iterations, "stop_threshold": 0.0}
    if args.run == "after":
        options["memory_budget_mib"] = args.budget_mib
        a, b = a.to(args.device), b.to(args.device)
    calibrator = SinkhornCalibrator(**options)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_device = torch.cuda.memory_allocated()
    base = _current_rss_bytes()
    with _PeakRss() as rss:
        timer = time.perf_counter()
        report = calibrator.calibrate(memory, a, b, labels, torch.Generator().manual_seed(2))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - timer
    peak = max(rss.peak - base, 0)
    result = {
        "run": args.run,
        "seconds": seconds,
        "peak_host_bytes": peak,
        "peak_device_bytes": torch.cuda.max_memory_allocated() - base_device if cuda else 0,
        "marginal_error": report.marginal_error,
        "mean_shift": float(report.mean_shift.mean()),
    }
    print(json.dumps(result))


def _child(args: argparse.Namespace, run: str) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--child",
        run,
        *("--classes", str(args.classes), "--images", str(args.images)),
        *("--iterations", str(args.iterations), "--threads", str(args.threads)),
        *("--device", args.device, "--budget-mib", str(args.budget_mib)),
    ]
    # Large blocks straight from mmap, so that the resident set follows live memory
    # (glibc otherwise keeps freed blocks of up to 32 MiB in its heap).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    if run == "before":
        folder = Path(tempfile.mkdtemp()) / "dmc_core"
        folder.mkdir()
        (folder / "__init__.py").write_text("")
        for name in ("memory.py", "calibration.py"):
            text = subprocess.run(
                ["git", "show", f"{args.before_ref}:dmc_core/{name}"],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (folder / name).write_text(text)
        env["PYTHONPATH"] = str(folder.parent)
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory_bytes(d: int, rank: int) -> dict[str, int]:
    from dmc_core.memory import GaussianMemory, MemoryConfig

    x = torch.randn(2 * d, d)
    sizes = {"float64 full (before)": 8 * (d + d * d)}
    for name, config in (
        ("float32 full (Cholesky)", MemoryConfig()),
        (f"float32 low-rank r={rank}", MemoryConfig(covariance="low_rank", rank=rank)),
    ):
        memory = GaussianMemory(config)
        memory.add_class(0, x)
        saved = sum(t.numel() * t.element_size() for t in memory.state_dict().values())
        sizes[name] = memory.nbytes()
        sizes[name + ", saved"] = saved
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-mib", type=float, default=256.0)
    parser.add_argument("--before-ref", default="main")
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--child", choices=["before", "after"])
    args = parser.parse_args()
    if args.child:
        args.run = args.child
        run_one(args)
        return
    print(
        f"{args.classes} old classes x 128 samples, {args.images} new images, d=384, "
        f"{args.iterations} Sinkhorn iterations, {args.threads} thread(s), device {args.device}"
    )
    results = {}
    for run in ("before", "after"):
        if run == "before" and args.skip_before:
            continue
        results[run] = _child(args, run)
        r = results[run]
        print(
            f"{run:>6}: {r['seconds']:8.1f} s, peak host {r['peak_host_bytes'] / 2**20:8.0f} MiB, "
            f"peak device {r['peak_device_bytes'] / 2**20:6.0f} MiB, "
            f"mean shift {r['mean_shift']:.4f}"
        )
    if "before" in results:
        before, after = results["before"], results["after"]
        after_peak = max(after["peak_host_bytes"], after["peak_device_bytes"], 1)
        print(
            f"ratios before/after: peak memory {before['peak_host_bytes'] / after_peak:.1f}x, "
            f"time {before['seconds'] / after['seconds']:.2f}x"
        )
    print("memory bytes per class (d=384):")
    for name, size in memory_bytes(384, 64).items():
        print(f"  {name:<34} {size:>9,d}  ({8 * (384 + 384 * 384) / size:.1f}x less than before)")


if __name__ == "__main__":
    main()
