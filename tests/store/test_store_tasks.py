"""Tasks: the class-name rule and the queries about the classes of tasks and versions."""

from __future__ import annotations

import pytest

from store.db import Database
from store.jobs import Jobs
from store.models import PENDING_STATES, JobState
from store.names import MAX_NAME_LENGTH, class_name_problem, normalize_class_name


@pytest.fixture
def jobs(db: Database) -> Jobs:
    return Jobs(db)


def test_the_class_name_rule() -> None:
    assert class_name_problem("tabby cat") is None
    assert "empty" in (class_name_problem("  ") or "")
    assert "characters" in (class_name_problem("x" * (MAX_NAME_LENGTH + 1)) or "")
    assert class_name_problem("x" * MAX_NAME_LENGTH) is None
    assert "at most 5" in (class_name_problem("abcdef", max_length=5) or "")
    assert "control characters" in (class_name_problem("a\tb") or "")
    for separator in ("\u2028", "\u2029", "\x85"):  # line, paragraph separator; NEL
        assert "control characters" in (class_name_problem(f"a{separator}b") or "")
    assert normalize_class_name("  Cafe\u0301 ") == "Caf\u00e9"


def test_submit_refuses_names_that_break_the_rule(jobs: Jobs) -> None:
    for bad in ("", " ", "x" * (MAX_NAME_LENGTH + 1), "line\nbreak"):
        with pytest.raises(ValueError):
            jobs.submit(class_names=[bad], image_counts=[1])


def test_queued_and_running_classes_are_taken_until_the_job_ends(jobs: Jobs) -> None:
    first = jobs.submit(class_names=["cat", "dog"], image_counts=[2, 2])
    second = jobs.submit(class_names=["owl"], image_counts=[2])
    jobs.start(second.job.id)
    assert jobs.tasks.pending_classes() == {
        "cat": first.task.id,
        "dog": first.task.id,
        "owl": second.task.id,
    }
    learned, pending = jobs.tasks.taken_class_names(["owl", "cat", "emu"])
    assert learned == []
    assert pending == {"cat": first.task.id, "owl": second.task.id}
    jobs.cancel(first.job.id)
    assert jobs.tasks.taken_class_names(["cat", "owl"]) == ([], {"owl": second.task.id})


def test_job_counts_and_pending(jobs: Jobs) -> None:
    assert jobs.counts() == {}
    assert not jobs.has_pending()
    a = jobs.submit(class_names=["a"], image_counts=[1])
    jobs.submit(class_names=["b"], image_counts=[1])
    assert jobs.has_pending()
    jobs.cancel(a.job.id)
    assert jobs.counts() == {JobState.QUEUED.value: 1, JobState.CANCELLED.value: 1}
    assert set(PENDING_STATES) == {JobState.QUEUED, JobState.RUNNING}


def test_replay_of_an_unknown_key_is_none(jobs: Jobs) -> None:
    assert jobs.replay("never-used", ["a"], [1]) is None
