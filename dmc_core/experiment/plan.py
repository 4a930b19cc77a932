"""Planning one seed of an experiment: the class order, the tasks, and which images each
class trains and is evaluated on (`make_plan`), and the data of one task (`task_data`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dmc_core.data.images import ClassificationDataset
from dmc_core.experiment.config import ExperimentConfig, ExperimentError
from dmc_core.experiment.methods import TaskData
from dmc_core.experiment.protocol import Protocol, class_order, split_tasks


@dataclass
class SeedPlan:
    """Everything one seed fixes: class order, tasks, and which images each class uses."""

    seed: int
    order: list[int]
    tasks: list[list[int]]
    train_index: dict[int, np.ndarray]
    eval_split: str
    eval_index: dict[int, np.ndarray]
    positions: dict[int, int] = field(init=False)

    def __post_init__(self) -> None:
        seen = [c for task in self.tasks for c in task]
        self.positions = {c: i for i, c in enumerate(seen)}

    def eval_counts(self) -> list[int]:
        return [sum(len(self.eval_index[c]) for c in task) for task in self.tasks]


def _choose(indices: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(indices):
        return indices
    return np.sort(rng.choice(indices, size=n, replace=False))


def make_plan(config: ExperimentConfig, dataset: ClassificationDataset, seed: int) -> SeedPlan:
    """Class order and image subsets of one seed.

    The validation hold-out and the test subset depend only on `dataset.subset_seed`, so
    every seed is evaluated on the same images; the train subset depends on the run's seed.
    """
    data = config.dataset
    n = dataset.n_classes
    if isinstance(config.class_order, list):
        order = class_order(n, order=config.class_order)
    else:
        order_seed = config.class_order if config.class_order is not None else seed
        order = class_order(n, seed=order_seed)
    tasks = split_tasks(order, Protocol.parse(config.protocol))
    if config.max_tasks is not None:
        tasks = tasks[: config.max_tasks]
    train_index: dict[int, np.ndarray] = {}
    eval_index: dict[int, np.ndarray] = {}
    for c in (c for task in tasks for c in task):
        pool = dataset.train.indices_of(c)
        held = np.zeros(0, dtype=np.int64)
        if data.validation_per_class:
            if len(pool) < data.validation_per_class + 2:
                raise ExperimentError(
                    f"class {dataset.class_names[c]!r} has {len(pool)} train images: too few "
                    f"for {data.validation_per_class} validation images and 2 to train on"
                )
            shuffled = np.random.default_rng([data.subset_seed, c, 1]).permutation(pool)
            held = np.sort(shuffled[: data.validation_per_class])
            pool = np.sort(shuffled[data.validation_per_class :])
        train_index[c] = _choose(pool, data.train_per_class, np.random.default_rng([seed, c]))
        if config.evaluation.split == "validation":
            eval_index[c] = held
        else:
            test_pool = dataset.test.indices_of(c)
            eval_index[c] = _choose(
                test_pool, data.test_per_class, np.random.default_rng([data.subset_seed, c, 2])
            )
        if len(eval_index[c]) == 0:
            raise ExperimentError(f"class {dataset.class_names[c]!r} has no evaluation images")
    eval_split = "train" if config.evaluation.split == "validation" else "test"
    return SeedPlan(seed, order, tasks, train_index, eval_split, eval_index)


def task_data(dataset: ClassificationDataset, plan: SeedPlan, t: int) -> TaskData:
    ids = plan.tasks[t]
    index = np.concatenate([plan.train_index[c] for c in ids])
    labels = np.concatenate([np.full(len(plan.train_index[c]), i) for i, c in enumerate(ids)])
    return TaskData(
        index=t,
        class_ids=ids,
        class_names=[dataset.class_names[c] for c in ids],
        images=dataset.train.images.subset(index),
        labels=labels.astype(np.int64),
    )
