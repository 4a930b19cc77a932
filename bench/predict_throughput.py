"""Predict throughput of the HTTP server over loopback, against the raw model.

    .venv/bin/python bench/predict_throughput.py [--model ViT-B-32] [--device cpu]
        [--clients 1 8 32] [--seconds 20] [--json results.json]

Builds a one-task version of `--model` (random weights: throughput does not depend on
them, and nothing is downloaded), publishes it in a fresh SQLite store and:

1. starts `dmc serve` (a separate process, embedded mode, auth on) on a free port;
2. for each client count N, in `--rounds` alternating rounds: measures the raw model's
   `encode_image` throughput (images/s) at batch size N in this process (the server is
   idle then), and runs N concurrent closed-loop clients against the server (each sends
   one JPEG at the model's input size per request, waits for the answer, sends the next)
   for `--seconds` after a warm-up;
3. prints, per N: server images/s, raw images/s at batch N (medians over the rounds),
   their ratio, and the p50 and p99 request latency. Target: a ratio of at least 0.8 at
   32 clients. Alternating rounds keep the comparison fair on a machine that other
   work shares.

Server and clients share this machine's CPUs (the clients take some of them), so on a
small CPU box the ratio is a lower bound of what a server with its own machine does.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dmc_core.backbone import BackboneSpec, load_backbone  # noqa: E402
from dmc_core.config import LearnerConfig  # noqa: E402
from dmc_core.learner import Learner  # noqa: E402
from dmc_core.state import save_state  # noqa: E402
from store.service import Store  # noqa: E402
from store.settings import StoreSettings  # noqa: E402
from tests.core.toy import colour_images  # noqa: E402

ADMIN_KEY = "bench-bootstrap-admin-key-0123456789"


def build_version(model: str, image_size: int | None, device: str, root: Path) -> Learner:
    """A version with two classes, published and active in the store at `root`."""
    spec = BackboneSpec(model, image_size=image_size)
    config = LearnerConfig(device=device).with_overrides(
        {"stage1.epochs": 0, "stage2.epochs": 1, "stage2.samples_per_old_class": 8}
    )
    torch.manual_seed(0)
    learner = Learner(load_backbone(spec, device=device), config)
    images, labels = colour_images([0, 1], 4, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    save_state(learner, root / "state")
    store = Store.open(
        StoreSettings(database_url=f"sqlite:///{root}/dmc.sqlite", objects_dir=root / "objects"),
        upgrade=True,
    )
    store.registry.publish(
        root / "state", parent_id=None, new_classes=["red", "green"], activate=True
    )
    store.close()
    learner.merge_for_inference()
    return learner


def input_size(learner: Learner) -> int:
    size = learner.backbone.model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def sample_jpeg(size: int) -> bytes:
    image = Image.effect_noise((size, size), 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def raw_throughput(learner: Learner, batch: int, image: bytes, seconds: float) -> float:
    """Images/s of `encode_image` on preprocessed batches of `batch` images."""
    pixels = learner.preprocess([Image.open(io.BytesIO(image)).convert("RGB")] * batch)
    with torch.inference_mode():
        for _ in range(2):
            learner.encode_images(pixels)
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        runs, started = 0, time.perf_counter()
        while runs < 3 or time.perf_counter() - started < seconds:
            learner.encode_images(pixels)
            runs += 1
        if learner.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    return runs * batch / elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(
    root: Path, port: int, device: str, extra: dict[str, str]
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMC_")}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "DMC_DATABASE_URL": f"sqlite:///{root}/dmc.sqlite",
            "DMC_OBJECTS_DIR": str(root / "objects"),
            "DMC_WORK_DIR": str(root),
            "DMC_DEVICE": device,
            "DMC_DISPATCHER": "embedded",
            "DMC_BOOTSTRAP_ADMIN_KEY": ADMIN_KEY,
            "DMC_PORT": str(port),
            "DMC_LOG_LEVEL": "warning",
            **extra,
        }
    )
    log = (root / "server.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "dmc_cli.main", "serve"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_ready(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"the server is not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


async def load(
    base: str, clients: int, image: bytes, warmup: float, seconds: float
) -> tuple[float, list[float], int]:
    """`clients` closed-loop clients, one image per request: (images/s, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    measuring = False
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base, headers={"X-API-Key": ADMIN_KEY}, timeout=300, limits=limits
    ) as client:

        async def one(stop_at: float) -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                response = await client.post(
                    "/predict", files={"images": ("x.jpg", image, "image/jpeg")}
                )
                if response.status_code != 200:
                    errors += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(one(time.perf_counter() + warmup) for _ in range(clients)))
        measuring = True
        started = time.perf_counter()
        await asyncio.gather(*(one(started + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies, errors


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="server time per round")
    parser.add_argument("--raw-seconds", type=float, default=6.0, help="raw time per round")
    parser.add_argument("--rounds", type=int, default=2, help="raw + server rounds per level")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the raw model and of the server (OMP_NUM_THREADS); 1 gives "
        "steady figures on a CPU box that other work shares",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"model {args.model}, device {args.device}, torch threads {torch.get_num_threads()}, "
        f"cpus {os.cpu_count()}; raw and server measured in alternating rounds"
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dmc-bench-") as tmp:
        root = Path(tmp)
        learner = build_version(args.model, args.image_size, args.device, root)
        size = input_size(learner)
        image = sample_jpeg(size)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        extra = {
            "DMC_BATCH_MAX_SIZE": str(args.max_batch),
            "DMC_BATCH_MAX_WAIT_MS": str(args.max_wait_ms),
        }
        if args.threads:
            extra.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        server = start_server(root, port, args.device, extra)
        try:
            wait_ready(base, server, root / "server.log", timeout=300)
            for clients in args.clients:
                raw: list[float] = []
                served: list[float] = []
                latencies: list[float] = []
                errors = 0
                for _ in range(args.rounds):
                    raw.append(raw_throughput(learner, clients, image, args.raw_seconds))
                    rate, times, failed = asyncio.run(
                        load(base, clients, image, args.warmup, args.seconds)
                    )
                    served.append(rate)
                    latencies += times
                    errors += failed
                result = {
                    "clients": clients,
                    "images_per_s": statistics.median(served),
                    "raw_images_per_s": statistics.median(raw),
                    "rounds": {"server": served, "raw": raw},
                    "requests": len(latencies),
                    "errors": errors,
                    "p50_ms": 1000 * percentile(latencies, 0.5),
                    "p99_ms": 1000 * percentile(latencies, 0.99),
                }
                result["ratio"] = result["images_per_s"] / result["raw_images_per_s"]
                results.append(result)
                print(
                    f"{clients:3d} clients: server {result['images_per_s']:8.1f} images/s, "
                    f"raw encode_image at batch {clients}: {result['raw_images_per_s']:8.1f}; "
                    f"ratio {result['ratio']:.2f}; p50 {result['p50_ms']:.1f} ms, "
                    f"p99 {result['p99_ms']:.1f} ms ({result['requests']} requests, "
                    f"{errors} errors)",
                    flush=True,
                )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    if args.json:
        summary = {
            "model": args.model,
            "device": args.device,
            "input_size": size,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "results": results,
        }
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
