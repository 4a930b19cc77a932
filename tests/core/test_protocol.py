"""Protocols: B/Inc parsing, task sizes, class orders, and what each seed fixes."""

from __future__ import annotations

import numpy as np
import pytest

from dmc_core.data.images import ArrayImages, ClassificationDataset, Split
from dmc_core.experiment.config import ExperimentConfig
from dmc_core.experiment.plan import make_plan
from dmc_core.experiment.protocol import Protocol, class_order, split_tasks

# PROOF's UCF-101 log (100 classes, seed 1993) starts with this order: the PyCIL convention.
PYCIL_ORDER_100_SEED_1993 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9]


@pytest.mark.parametrize(
    ("text", "base", "increment"),
    [("B0-Inc10", 0, 10), ("b50-inc10", 50, 10), ("B10Inc5", 10, 5), (" B0 - Inc20 ", 0, 20)],
)
def test_parse(text: str, base: int, increment: int) -> None:
    protocol = Protocol.parse(text)
    assert (protocol.base, protocol.increment) == (base, increment)
    assert str(protocol) == f"B{base}-Inc{increment}"


@pytest.mark.parametrize("text", ["", "B0", "Inc10", "B-1-Inc10", "B0-Inc0", "0-10", "B0-Inc10x"])
def test_parse_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"B<base>-Inc<increment>|at least 1"):
        Protocol.parse(text)


@pytest.mark.parametrize(
    ("text", "n", "sizes"),
    [
        ("B0-Inc10", 100, [10] * 10),
        ("B0-Inc20", 200, [20] * 10),
        ("B0-Inc10", 101, [10] * 10 + [1]),  # the remainder is a last, smaller task
        ("B50-Inc10", 100, [50] + [10] * 5),
        ("B0-Inc2", 10, [2] * 5),
        ("B0-Inc3", 10, [3, 3, 3, 1]),
        ("B10-Inc5", 10, [10]),
    ],
)
def test_task_sizes(text: str, n: int, sizes: list[int]) -> None:
    assert Protocol.parse(text).task_sizes(n) == sizes


def test_base_larger_than_dataset() -> None:
    with pytest.raises(ValueError, match="needs 20 classes"):
        Protocol.parse("B20-Inc5").task_sizes(10)


def test_default_order_is_pycil() -> None:
    order = class_order(100)
    assert order[: len(PYCIL_ORDER_100_SEED_1993)] == PYCIL_ORDER_100_SEED_1993
    np.random.seed(1993)
    assert order == np.random.permutation(100).tolist()
    assert class_order(100, seed=1994) != order
    assert class_order(5, seed=None) == [0, 1, 2, 3, 4]


def test_explicit_order() -> None:
    assert class_order(4, order=[3, 1, 0, 2]) == [3, 1, 0, 2]
    for bad in ([0, 1, 2], [0, 1, 1, 2], [0, 1, 2, 4]):
        with pytest.raises(ValueError, match="permutation"):
            class_order(4, order=bad)


def test_split_tasks() -> None:
    order = [5, 3, 1, 0, 4, 2, 6]
    assert split_tasks(order, Protocol.parse("B3-Inc2")) == [[5, 3, 1], [0, 4], [2, 6]]


def _dataset(n_classes: int = 6, train: int = 10, test: int = 8) -> ClassificationDataset:
    def split(per_class: int) -> Split:
        labels = np.repeat(np.arange(n_classes), per_class)
        return Split(ArrayImages(np.zeros((len(labels), 2, 2), dtype=np.uint8)), labels)

    names = [f"class {i}" for i in range(n_classes)]
    return ClassificationDataset("toy", names, split(train), split(test))


def _config(**overrides: object) -> ExperimentConfig:
    data: dict[str, object] = {
        "name": "plan",
        "dataset": {"name": "fashion_mnist", "train_per_class": 4, "test_per_class": 3},
        "protocol": "B0-Inc2",
        "seeds": [1, 2],
        "methods": ["zeroshot"],
        "evaluation": {"diagnostics": []},
    }
    data.update(overrides)
    return ExperimentConfig.from_dict(data)


def test_each_seed_fixes_order_and_train_subset_but_not_the_test_images() -> None:
    dataset, config = _dataset(), _config()
    one, two = make_plan(config, dataset, 1), make_plan(config, dataset, 2)
    assert one.order == class_order(6, seed=1) and two.order == class_order(6, seed=2)
    assert one.tasks == split_tasks(one.order, Protocol(0, 2))
    assert make_plan(config, dataset, 1).train_index.keys() == one.train_index.keys()
    for c in range(6):
        assert len(one.train_index[c]) == 4 and set(dataset.train.labels[one.train_index[c]]) == {c}
        np.testing.assert_array_equal(
            make_plan(config, dataset, 1).train_index[c], one.train_index[c]
        )
        np.testing.assert_array_equal(one.eval_index[c], two.eval_index[c])
        assert len(one.eval_index[c]) == 3 and set(dataset.test.labels[one.eval_index[c]]) == {c}
    assert any(not np.array_equal(one.train_index[c], two.train_index[c]) for c in range(6))
    assert one.eval_counts() == [6, 6, 6]


def test_fixed_and_explicit_class_orders() -> None:
    dataset = _dataset()
    fixed = _config(class_order=7)
    assert make_plan(fixed, dataset, 1).order == make_plan(fixed, dataset, 2).order
    assert make_plan(fixed, dataset, 1).order == class_order(6, seed=7)
    explicit = _config(class_order=[5, 4, 3, 2, 1, 0])
    assert make_plan(explicit, dataset, 1).tasks == [[5, 4], [3, 2], [1, 0]]
    assert (
        make_plan(_config(max_tasks=2), dataset, 1).tasks
        == make_plan(_config(), dataset, 1).tasks[:2]
    )


def test_validation_split_is_held_out_of_train() -> None:
    dataset = _dataset()
    data = {"name": "fashion_mnist", "train_per_class": None, "validation_per_class": 3}
    config = _config(dataset=data, evaluation={"split": "validation", "diagnostics": []})
    one, two = make_plan(config, dataset, 1), make_plan(config, dataset, 2)
    assert one.eval_split == "train"
    for c in range(6):
        held = set(one.eval_index[c].tolist())
        assert len(held) == 3 and not held & set(one.train_index[c].tolist())
        assert len(one.train_index[c]) == 7
        np.testing.assert_array_equal(one.eval_index[c], two.eval_index[c])
