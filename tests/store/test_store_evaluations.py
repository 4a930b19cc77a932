"""Evaluation sets in the store: revisions per name (also when added at once), images read
back intact, nothing recorded for a refused set, and the images of a set whose row was
never written collected as garbage; evaluations newest per set."""

from __future__ import annotations

import threading

import pytest

from store.db import Database
from store.evaluations import EVALUATION_SETS_ROOT, Evaluations, EvaluationSets
from store.objects import ObjectStore
from store.registry import Registry
from store.uploads import UploadedImage, save_images

IMAGES = [UploadedImage("red", "a.png", b"red-bytes"), UploadedImage("blue", "b.png", b"blue")]


def add(sets: EvaluationSets, name: str = "held-out") -> int:
    return sets.add(name, IMAGES, class_names=["blue", "red"], image_counts=[1, 1]).revision


def test_revisions_per_name_even_when_added_at_once(db: Database, objects: ObjectStore) -> None:
    sets = EvaluationSets(db, objects)
    threads = [threading.Thread(target=add, args=(sets,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert add(sets, "other") == 1
    listed = sets.list()
    assert [(s.name, s.revision) for s in listed] == [
        ("held-out", 3), ("held-out", 2), ("held-out", 1), ("other", 1)
    ]  # fmt: skip
    assert [(s.name, s.revision) for s in sets.list(latest_only=True)] == [
        ("held-out", 3),
        ("other", 1),
    ]
    assert sets.load(listed[0]) == IMAGES


def test_a_refused_set_stores_nothing(db: Database, objects: ObjectStore) -> None:
    sets = EvaluationSets(db, objects)
    with pytest.raises(ValueError, match="control characters"):
        sets.add("bad\x00name", IMAGES, class_names=["blue", "red"], image_counts=[1, 1])
    with pytest.raises(ValueError):
        sets.add("x", IMAGES, class_names=["red", "red"], image_counts=[1, 1])
    assert sets.list() == [] and list(objects.list(f"{EVALUATION_SETS_ROOT}/")) == []


def test_orphaned_images_are_collected(db: Database, objects: ObjectStore) -> None:
    sets = EvaluationSets(db, objects, gc_grace_seconds=0)
    kept = sets.get(
        sets.add("held-out", IMAGES, class_names=["blue", "red"], image_counts=[1, 1]).id
    )
    orphan = save_images(objects, EVALUATION_SETS_ROOT, IMAGES)  # a request died here
    removed = sets.collect_garbage()
    assert removed and all(key.startswith(orphan) for key in removed)
    assert sets.load(kept) == IMAGES


def test_evaluations_newest_per_set(db: Database, objects: ObjectStore) -> None:
    sets = EvaluationSets(db, objects)
    registry = Registry(db, objects)
    version = registry.publish({"state.json": b"{}"}, parent_id=None, new_classes=["red"])
    first = sets.add("a", IMAGES, class_names=["blue", "red"], image_counts=[1, 1])
    evaluations = Evaluations(db)
    evaluations.record(version.id, None, {first.id: {"overall": {"accuracy": 10.0}}})
    evaluations.record(version.id, None, {first.id: {"overall": {"accuracy": 90.0}}})
    [newest] = evaluations.for_version(version.id)
    assert newest.results["overall"]["accuracy"] == 90.0
    assert newest.evaluation_set == first and newest.baseline_id is None
