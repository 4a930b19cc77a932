"""Metrics against matrices computed by hand."""

from __future__ import annotations

import math

import pytest

from dmc_core.experiment.metrics import accuracy_matrix, aggregate, compute_metrics, mean_std

# Three tasks with 10, 20 and 10 test images.
COUNTS = [10, 20, 10]
CORRECT = [[8], [6, 18], [5, 10, 9]]


def test_accuracy_matrix() -> None:
    assert accuracy_matrix(CORRECT, COUNTS) == [
        [80.0, None, None],
        [60.0, 90.0, None],
        [50.0, 50.0, 90.0],
    ]


def test_metrics_by_hand() -> None:
    m = compute_metrics(CORRECT, COUNTS)
    # A_t over all images of the tasks seen: 8/10, 24/30, 24/40.
    assert m["accuracy_per_task"] == pytest.approx([80.0, 80.0, 60.0])
    assert m["avg"] == pytest.approx((80 + 80 + 60) / 3)
    assert m["last"] == pytest.approx(60.0)
    # Task 0: best before the end max(80, 60) = 80, final 50 -> 30; task 1: 90 - 50 = 40.
    assert m["forgetting_per_task"] == pytest.approx([30.0, 40.0])
    assert m["forgetting"] == pytest.approx(35.0)
    # PyCIL's best includes the final row: the same here, as no task got better at the end.
    assert m["forgetting_pycil_per_task"] == pytest.approx([30.0, 40.0])
    # Old: images of earlier tasks (6/10; 15/30); new: the task's own.
    assert m["old_accuracy"][0] is None
    assert m["old_accuracy"][1:] == pytest.approx([60.0, 50.0])
    assert m["new_accuracy"] == pytest.approx([80.0, 90.0, 90.0])
    assert m["accuracy_matrix"] == accuracy_matrix(CORRECT, COUNTS)


def test_forgetting_can_be_negative_and_ignores_the_final_row_in_the_best() -> None:
    m = compute_metrics([[2], [4, 5], [10, 10, 3]], [10, 10, 10])
    # Task 0: best before the end 40, final 100 -> -60; task 1: 50 - 100 = -50.
    assert m["forgetting_per_task"] == pytest.approx([-60.0, -50.0])
    assert m["forgetting"] == pytest.approx(-55.0)
    # PyCIL's: the best is the final row itself, so nothing is forgotten.
    assert m["forgetting_pycil_per_task"] == [0.0, 0.0] and m["forgetting_pycil"] == 0.0


def test_the_two_forgettings_differ_only_where_the_last_row_is_the_best() -> None:
    # Task 0: 80 -> 40 -> 90 (best 80 before the end, 90 overall); task 1: 90 -> 70.
    m = compute_metrics([[8], [4, 9], [9, 7, 5]], [10, 10, 10])
    assert m["forgetting_per_task"] == pytest.approx([-10.0, 20.0])
    assert m["forgetting_pycil_per_task"] == pytest.approx([0.0, 20.0])
    assert (m["forgetting"], m["forgetting_pycil"]) == pytest.approx((5.0, 10.0))


def test_one_task_and_partial_runs() -> None:
    one = compute_metrics([[3]], [4, 4])
    assert one["accuracy_per_task"] == [75.0] and one["forgetting"] is None
    assert one["forgetting_pycil"] is None
    assert one["avg"] == one["last"] == 75.0
    empty = compute_metrics([], [4])
    assert empty["avg"] is None and empty["accuracy_per_task"] == []


@pytest.mark.parametrize(
    ("correct", "counts", "message"),
    [
        ([[1, 2]], [5, 5], "row 0"),
        ([[6]], [5], "not in"),
        ([[1], [1, 1], [1, 1, 1]], [5, 5], "3 rows"),
        ([[0]], [0], "at least one"),
    ],
)
def test_bad_counts(correct: list[list[int]], counts: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(correct, counts)


def test_mean_std_and_aggregate() -> None:
    stats = mean_std([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(1.0) and stats["n"] == 3
    assert mean_std([4.0])["std"] == 0.0
    assert mean_std([None, None])["mean"] is None
    a = compute_metrics(CORRECT, COUNTS)
    b = compute_metrics([[10], [10, 20], [10, 20, 10]], COUNTS)
    summary = aggregate([a, b])
    assert summary["last"]["mean"] == pytest.approx(80.0)
    assert summary["last"]["std"] == pytest.approx(math.sqrt(2 * 20**2))
    assert summary["forgetting"]["values"] == [pytest.approx(35.0), pytest.approx(0.0)]
    assert summary["forgetting_pycil"]["values"] == [pytest.approx(35.0), pytest.approx(0.0)]
    assert summary["old_accuracy_last"]["mean"] == pytest.approx((50 + 100) / 2)
    assert summary["new_accuracy_last"]["mean"] == pytest.approx((90 + 100) / 2)
    assert [s["mean"] for s in summary["accuracy_per_task"]] == pytest.approx([90, 90, 80])
