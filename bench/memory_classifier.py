"""Are the memory's calibrated covariances usable as a classifier? (issue 20, item 9)

Learns the Fashion-MNIST benchmark's tasks with DMC-OT (stand-in backbone, one seed,
its settings; stage 2 skipped: it trains prompts only, so it changes neither the encoder
nor the memory), and records each task's features under the encoder before and after
stage 1. The encoder's trajectory does not depend on how the memory is calibrated, so
every calibration variant is then replayed on the same recorded features, and scored on
the test images under the final encoder:

- Mahalanobis with the memory's means and covariances, and cosine to its means;
- the same with statistics recomputed from the train images under the final encoder
  (what a perfect calibration would give) and with the uncalibrated statistics;

for METHOD's shrinkage ("below_dim"), Ledoit-Wolf's, and a low-rank-plus-diagonal memory.

    python bench/memory_classifier.py [--seed 1993] [--tasks 5] [--record FILE]

Recording takes a few minutes on 2 CPU cores; the replay, seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dmc_core.calibration import get_calibrator
from dmc_core.class_scores import cosine_scores, mahalanobis_scores, precision_matrices
from dmc_core.memory import GaussianMemory, MemoryConfig

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_standin.yaml"


def record(seed: int, n_tasks: int, loss_classes: str, cache_dir: str) -> dict[str, Any]:
    from dmc_core.experiment.config import load_experiment_config
    from dmc_core.experiment.runner import ExperimentRunner, _task_data, make_plan
    from dmc_core.learner import Learner

    config = load_experiment_config(CONFIG, [f"backbone.cache_dir={cache_dir}"])
    runner = ExperimentRunner(config, Path(tempfile.mkdtemp()), show_progress=False)
    plan = make_plan(config, runner.dataset, seed)
    learner_config = config.learner_config("dmc_ot", seed).with_overrides(
        {"stage2.epochs": 0, "calibration.method": "none", "stage1.loss_classes": loss_classes}
    )
    learner = Learner(runner._fresh_backbone(), learner_config)
    quiet = lambda *_: None  # noqa: E731
    tasks = []
    for t in range(min(n_tasks, len(plan.tasks))):
        task = _task_data(runner.dataset, plan, t)
        labels = task.labels.tolist()
        before = learner._encode_dataset(task.images, labels, quiet) if t else None
        timer = time.perf_counter()
        learner.learn_task(task.images, labels, task.class_names)
        after = learner._encode_dataset(task.images, labels, quiet)
        print(f"task {t}: learned in {time.perf_counter() - timer:.0f} s", flush=True)
        tasks.append({"before": before, "after": after, "labels": torch.as_tensor(task.labels)})
    seen = [c for t in range(len(tasks)) for c in plan.tasks[t]]
    test_split = runner.dataset.split(plan.eval_split)
    test_x: list[torch.Tensor] = []
    test_y: list[torch.Tensor] = []
    train_x: list[torch.Tensor] = []
    train_y: list[torch.Tensor] = []
    for position, c in enumerate(seen):
        for split, index, xs, ys in (
            (test_split, plan.eval_index[c], test_x, test_y),
            (runner.dataset.train, plan.train_index[c], train_x, train_y),
        ):
            images = split.images.subset(index)
            xs.append(learner._encode_dataset(images, [0] * len(images), quiet))
            ys.append(torch.full((len(images),), position))
    return {
        "tasks": tasks,
        "test": (torch.cat(test_x), torch.cat(test_y)),
        "train_final": (torch.cat(train_x), torch.cat(train_y)),
    }


def _accuracy(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(dim=1) == y).double().mean())


def mahalanobis_accuracy(memory: GaussianMemory, x: torch.Tensor, y: torch.Tensor) -> float:
    classes = memory.class_indices
    means = torch.stack([memory.mean(c) for c in classes])
    covariances = torch.stack([memory.covariance(c) for c in classes])
    return _accuracy(mahalanobis_scores(x, means, precision_matrices(covariances)), y)


def cosine_accuracy(memory: GaussianMemory, x: torch.Tensor, y: torch.Tensor) -> float:
    means = torch.stack([memory.mean(c) for c in memory.class_indices])
    return _accuracy(cosine_scores(x, means, 1.0), y)


def replay(data: dict[str, Any], config: MemoryConfig, calibrator: Any) -> GaussianMemory:
    memory = GaussianMemory(config)
    generator = torch.Generator().manual_seed(0)
    for t, task in enumerate(data["tasks"]):
        if t and calibrator is not None:
            calibrator.calibrate(memory, task["before"], task["after"], task["labels"], generator)
        first = len(memory)
        for i in range(int(task["labels"].max()) + 1):
            memory.add_class(first + i, task["after"][task["labels"] == i])
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1993)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--loss-classes", default="task", choices=["task", "seen"])
    parser.add_argument("--record", type=Path, help="features file: reused if it exists")
    parser.add_argument("--rank", type=int, default=64, help="of the low-rank memory rows")
    parser.add_argument("--models", default=".cache/models", help="the stand-in's cache folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.record is not None and args.record.is_file():
        data = torch.load(args.record)
    else:
        data = record(args.seed, args.tasks, args.loss_classes, args.models)
        if args.record is not None:
            torch.save(data, args.record)
    test_x, test_y = data["test"]
    train_x, train_y = data["train_final"]

    sinkhorn = {"samples_per_class": 128, "reg": 0.05}
    variants: dict[str, Any] = {
        "uncalibrated": None,
        "sinkhorn, sample difference, floor 1e-10 (before)": get_calibrator(
            "sinkhorn", **sinkhorn, covariance_update="sample_difference", min_eigenvalue=1e-10
        ),
        "sinkhorn, sample difference, floor eps": get_calibrator(
            "sinkhorn", **sinkhorn, covariance_update="sample_difference"
        ),
        "sinkhorn, linear map": get_calibrator(
            "sinkhorn", **sinkhorn, covariance_update="linear_map"
        ),
        "sinkhorn, means only": get_calibrator("sinkhorn", **sinkhorn, covariance_update="none"),
        "bures": get_calibrator("bures"),
    }
    print(f"{len(test_y)} test images, {int(test_y.max()) + 1} classes, d={test_x.shape[1]}")
    print(f"{'memory':<12} {'statistics':<52} {'mahalanobis':>11} {'cosine':>7}")
    configs = {
        "below_dim": MemoryConfig(shrinkage="below_dim"),
        "ledoit_wolf": MemoryConfig(shrinkage="ledoit_wolf"),
        f"lw, rank {args.rank}": MemoryConfig(covariance="low_rank", rank=args.rank),
    }
    for shrinkage, config in configs.items():
        recomputed = GaussianMemory(config)
        for c in range(int(train_y.max()) + 1):
            recomputed.add_class(c, train_x[train_y == c])
        rows = {"recomputed under the final encoder": recomputed}
        for name, calibrator in variants.items():
            rows[name] = replay(
                data, config, dataclasses.replace(calibrator) if calibrator else None
            )
        for name, memory in rows.items():
            maha = mahalanobis_accuracy(memory, test_x, test_y)
            cos = cosine_accuracy(memory, test_x, test_y)
            print(f"{shrinkage:<12} {name:<52} {100 * maha:>10.1f}% {100 * cos:>6.1f}%")


if __name__ == "__main__":
    main()
