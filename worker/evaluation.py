"""Evaluating versions on the evaluation sets: in a job (a stage with progress, before the
promotion gate decides) and on demand (`evaluate_version`, POST /versions/{id}/evaluate).

A version's result on a set covers the set's images of the classes the version knows:
accuracy overall, per class, on its old classes (its parent's) and on its new ones, each
next to the parent's on the same images, and the confusion counts."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmc_core.learner import Learner
from store.evaluations import EvaluationInfo, EvaluationSetInfo
from store.service import Store
from worker.images import decode_image
from worker.model import load_version
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

STAGE = "evaluate"
# The confusion matrix's column for predictions of classes the set does not hold.
OTHER = "(other)"

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SetImages:
    """The images of one evaluation set as stored (encoded: a batch at a time is decoded,
    so a large set never sits in memory as pixels), with their class names."""

    info: EvaluationSetInfo
    images: list[bytes]
    names: list[str]

    def covering(self, classes: Sequence[str]) -> SetImages | None:
        """Only the images of `classes`; None when there are none."""
        known = set(classes)
        keep = [i for i, name in enumerate(self.names) if name in known]
        if not keep:
            return None
        return SetImages(self.info, [self.images[i] for i in keep], [self.names[i] for i in keep])


class EvaluationRun:
    """The evaluation sets that cover a version's classes, and what its learner (and its
    parent's, on the same images) predicts for them."""

    def __init__(self, sets: Sequence[SetImages], *, max_side: int) -> None:
        self.sets = list(sets)
        self.max_side = max_side

    @classmethod
    def load(cls, store: Store, classes: Sequence[str], *, max_side: int) -> EvaluationRun:
        """The newest revision of every evaluation set, restricted to `classes`; images
        are decoded as uploads are (at most `max_side` pixels a side)."""
        covered = []
        for info in store.evaluation_sets.list(latest_only=True):
            if not set(info.class_names) & set(classes):
                continue
            uploads = store.evaluation_sets.load(info)
            whole = SetImages(info, [u.data for u in uploads], [u.class_name for u in uploads])
            part = whole.covering(classes)
            if part is not None:
                covered.append(part)
        return cls(covered, max_side=max_side)

    @property
    def image_count(self) -> int:
        return sum(len(s.images) for s in self.sets)

    @property
    def stages(self) -> list[str]:
        """The progress stage of one pass over the images (none when nothing is covered)."""
        return [STAGE] if self.sets else []

    def predict(self, learner: Learner, progress: Progress | None = None) -> list[list[str]]:
        """Top-1 class names per image, per set."""
        total, done = self.image_count, 0
        batch = max(1, learner.config.feature_batch_size)
        out: list[list[str]] = []
        for part in self.sets:
            names: list[str] = []
            for start in range(0, len(part.images), batch):
                chunk = [
                    decode_image(data, max_side=self.max_side)
                    for data in part.images[start : start + batch]
                ]
                names += [p.names[0] for p in learner.predict(chunk, top_k=1)]
                done += len(chunk)
                if progress is not None:
                    progress(STAGE, done, total)
            out.append(names)
        return out

    def results(
        self,
        predicted: Sequence[Sequence[str]],
        baseline: Sequence[Sequence[str]] | None,
        *,
        old_classes: Sequence[str],
        new_classes: Sequence[str],
    ) -> dict[int, dict[str, Any]]:
        """{evaluation set id: results}, see `set_result`."""
        return {
            part.info.id: set_result(
                part,
                predicted[i],
                baseline[i] if baseline is not None else None,
                old_classes=old_classes,
                new_classes=new_classes,
            )
            for i, part in enumerate(self.sets)
        }


def set_result(
    part: SetImages,
    predicted: Sequence[str],
    baseline: Sequence[str] | None,
    *,
    old_classes: Sequence[str],
    new_classes: Sequence[str],
) -> dict[str, Any]:
    """One set's results as JSON: `overall`, `old`, `new` ({images, correct, accuracy,
    parent_correct, parent_accuracy, change}), `per_class` (label order), `confusion`."""
    truth = part.names
    old, new = set(old_classes), set(new_classes)
    present = set(truth)
    order = [c for c in [*old_classes, *new_classes] if c in present]

    def group(members: set[str] | None) -> dict[str, Any]:
        index = [i for i, name in enumerate(truth) if members is None or name in members]
        correct = sum(predicted[i] == truth[i] for i in index)
        parent = None if baseline is None else sum(baseline[i] == truth[i] for i in index)
        return _accuracies(len(index), correct, parent)

    per_class = [{"name": name, "old": name in old, **group({name})} for name in order]
    columns = [*order, OTHER]
    counts = Counter(
        (name, guess if guess in present else OTHER)
        for name, guess in zip(truth, predicted, strict=True)
    )
    return {
        "evaluation_set": {
            "id": part.info.id,
            "name": part.info.name,
            "revision": part.info.revision,
        },
        "overall": group(None),
        "old": group(old),
        "new": group(new),
        "per_class": per_class,
        "confusion": {
            "classes": order,
            "predicted": columns,
            "counts": [[counts[(row, col)] for col in columns] for row in order],
        },
    }


def _accuracies(images: int, correct: int, parent: int | None) -> dict[str, Any]:
    accuracy = 100.0 * correct / images if images else None
    parent_accuracy = 100.0 * parent / images if images and parent is not None else None
    change = (
        accuracy - parent_accuracy if accuracy is not None and parent_accuracy is not None else None
    )
    return {
        "images": images,
        "correct": correct,
        "accuracy": accuracy,
        "parent_correct": parent,
        "parent_accuracy": parent_accuracy,
        "change": change,
    }


def evaluate_version(
    store: Store, settings: WorkerSettings, version_id: int
) -> list[EvaluationInfo]:
    """Evaluate a stored version (and its parent, on the same images) on the newest
    revision of every evaluation set now, record the results and return them."""
    registry = store.registry
    version = registry.get(version_id)
    classes = registry.class_names(version_id)
    run = EvaluationRun.load(store, classes, max_side=settings.max_image_side)
    if not run.sets:
        return store.evaluations.for_version(version_id)
    old = registry.class_names(version.parent_id) if version.parent_id is not None else []
    baseline = None
    if version.parent_id is not None:
        baseline = run.predict(_inference_learner(store, settings, version.parent_id))
    predicted = run.predict(_inference_learner(store, settings, version_id))
    new = [c for c in classes if c not in set(old)]
    results = run.results(predicted, baseline, old_classes=old, new_classes=new)
    store.evaluations.record(version_id, version.parent_id, results)
    log.info("version %d evaluated on %d set(s)", version_id, len(results))
    return store.evaluations.for_version(version_id)


def _inference_learner(store: Store, settings: WorkerSettings, version_id: int) -> Learner:
    return load_version(
        store.registry,
        version_id,
        part="inference",
        device=settings.device,
        cache_dir=settings.model_cache_dir,
    )
