"""A short walkthrough of the library on real images: the offline stand-in backbone learns
Fashion-MNIST classes task by task and is evaluated on held-out images after each task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from tqdm import tqdm

from dmc_core.backbone import load_backbone
from dmc_core.config import LearnerConfig
from dmc_core.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist, to_pil
from dmc_core.learner import Learner
from dmc_core.standin import STANDIN_NAME

TASKS = ([0, 1], [7, 8])  # t-shirt, trouser; then sneaker, bag
TEST_PER_CLASS = 50


def _subset(labels: np.ndarray, classes: list[int], per_class: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(labels == k)[:per_class] for k in classes])


def run_library_demo(cache_dir: Path, images_per_class: int) -> None:
    typer.echo(f"Loading the offline stand-in backbone ({STANDIN_NAME}); built on first use.")
    backbone = load_backbone(STANDIN_NAME, cache_dir=cache_dir)
    config = LearnerConfig(method="dmc_ot").with_overrides(
        {"stage1.epochs": 1, "stage1.batch_size": 16, "stage2.epochs": 5}
    )
    learner = Learner(backbone, config)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    seen: list[int] = []
    for task, classes in enumerate(TASKS):
        names = [FASHION_MNIST_CLASSES[k] for k in classes]
        index = _subset(train_y, classes, images_per_class)
        labels = [classes.index(int(y)) for y in train_y[index]]
        typer.echo(f"\nTask {task + 1}: learning {names} from {len(index)} images")
        with tqdm(total=100, unit="%", leave=False) as bar:

            def progress(stage: str, step: int, total: int) -> None:
                bar.set_description(stage)
                bar.n = round(100 * step / total)
                bar.refresh()

            report = learner.learn_task(to_pil(train_x[index]), labels, names, progress=progress)
        seen += classes
        held_out = _subset(test_y, seen, TEST_PER_CLASS)
        predictions = learner.predict(to_pil(test_x[held_out]), top_k=3)
        truth = [FASHION_MNIST_CLASSES[int(y)] for y in test_y[held_out]]
        accuracy = np.mean([p.names[0] == t for p, t in zip(predictions, truth, strict=True)])
        typer.echo(
            f"  train accuracy {report.train_accuracy:.2f}; held-out accuracy on "
            f"{len(seen)} classes so far: {accuracy:.2%} ({len(held_out)} images)"
        )
    sample = predictions[0]
    typer.echo(f"\nExample prediction (truth: {truth[0]}):")
    for name, p in zip(sample.names, sample.probabilities, strict=True):
        typer.echo(f"  {name:>12}  {p:.3f}")
