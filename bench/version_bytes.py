"""Bytes each version stores, before and after content addressing, and what a replica fetches.

    .venv/bin/python bench/version_bytes.py [--model dmc-tiny-vit] [--image-size N]
        [--cache-dir DIR] [--tasks 4] [--classes-per-task 2] [--methods dmc dmc_ot]
        [--json out.json]

Learns `--tasks` tasks of synthetic images (one random colour per class) on `--model`
(random weights: sizes do not depend on them) with each method's short test schedule,
and after each task saves the state and publishes it in a fresh SQLite store. Prints per
task: the classes, what the version stored before this change (format 1: every version
wrote its whole state again, memory included), what it stores now (`added_bytes`: the
blobs no earlier version had), its total size and the inference part a replica fetches.
DMC leaves old classes' statistics unchanged, so old tasks' memory files are shared;
DMC-OT's calibration moves them, so each version stores the whole memory again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from safetensors.torch import save  # noqa: E402

from bench.scale import task_data  # noqa: E402
from dmc_core.backbone import BackboneSpec, load_backbone  # noqa: E402
from dmc_core.learner import Learner  # noqa: E402
from dmc_core.state import save_state, state_tensors  # noqa: E402
from dmc_core.state_files import files_of_part  # noqa: E402
from store.service import Store  # noqa: E402
from store.settings import StoreSettings  # noqa: E402
from tests.core.toy import fast_config  # noqa: E402


def run(method: str, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    tasks, per_task = args.tasks, args.classes_per_task
    torch.manual_seed(0)
    spec = BackboneSpec(args.model, image_size=args.image_size)
    learner = Learner(load_backbone(spec, cache_dir=args.cache_dir), fast_config(method))
    store = Store.open(
        StoreSettings(database_url=f"sqlite:///{root}/dmc.sqlite", objects_dir=root / "objects"),
        upgrade=True,
    )
    rows: list[dict[str, Any]] = []
    parent = None
    try:
        for task in range(tasks):
            colours = list(range(task * per_task, (task + 1) * per_task))
            names = [f"{method} colour {c}" for c in colours]
            images, labels = task_data(colours[0], len(colours), 8, 32)
            learner.learn_task(images, labels, names)
            folder = root / f"state-{task}"
            manifest = save_state(learner, folder)
            version = store.registry.publish(folder, parent_id=parent, new_classes=names)
            parent = version.id
            inference = sum(
                (folder / name).stat().st_size for name in files_of_part(manifest, "inference")
            )
            format_1 = len(save(state_tensors(learner))) + (folder / "manifest.json").stat().st_size
            rows.append(
                {
                    "task": task,
                    "classes": len(learner.class_names),
                    "before_bytes": format_1,
                    "added_bytes": version.added_bytes,
                    "total_bytes": version.size_bytes,
                    "inference_bytes": inference,
                }
            )
    finally:
        store.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dmc-tiny-vit")
    parser.add_argument("--image-size", type=int, help="input size (e.g. 64 for the stand-in)")
    parser.add_argument("--cache-dir", type=Path, help="where the stand-in is built")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--classes-per-task", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["dmc", "dmc_ot"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        with tempfile.TemporaryDirectory(prefix=f"dmc-bytes-{method}-") as tmp:
            rows = run(method, args, Path(tmp))
        results[method] = rows
        print(f"\n{method} on {args.model}: bytes per version")
        print("task  classes  before(format 1)  added now  total now  inference part")
        for r in rows:
            print(
                f"{r['task']:>4}  {r['classes']:>7}  {r['before_bytes']:>16}  "
                f"{r['added_bytes']:>9}  {r['total_bytes']:>9}  {r['inference_bytes']:>14}"
            )
        before = sum(r["before_bytes"] for r in rows)
        added = sum(r["added_bytes"] for r in rows)
        print(f"all versions: before {before} bytes, now {added} bytes ({added / before:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
