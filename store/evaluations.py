"""Evaluation sets (named, revisioned labelled image sets kept in the object store), the
evaluations of versions on them, and the promotion gate rule a job applies to them."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import EvaluationSetNotFoundError
from store.garbage import collect_unreferenced
from store.models import Evaluation, EvaluationSet, utcnow
from store.names import class_name_problem
from store.objects import ObjectStore
from store.tasks import validate_task
from store.uploads import (
    ImageStream,
    UploadedImage,
    discard_images,
    load_images,
    save_images,
)

EVALUATION_SETS_ROOT = "evaluation-sets"


@dataclass(frozen=True)
class GateRule:
    """When a newly learned version may become active: accuracy on the old classes (those
    of its parent) drops by at most `max_old_drop` points against the parent on the same
    images, and accuracy on its new classes reaches at least `min_new_accuracy` percent.
    None: that condition is not checked."""

    max_old_drop: float | None = None
    min_new_accuracy: float | None = None

    @property
    def checks_anything(self) -> bool:
        return self.max_old_drop is not None or self.min_new_accuracy is not None

    def as_json(self) -> dict[str, float | None]:
        return {"max_old_drop": self.max_old_drop, "min_new_accuracy": self.min_new_accuracy}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateRule:
        return cls(
            max_old_drop=_number(data.get("max_old_drop")),
            min_new_accuracy=_number(data.get("min_new_accuracy")),
        )

    def overridden_by(self, override: Mapping[str, Any] | None) -> GateRule:
        """This rule with the conditions an upload set replaced (the others stay)."""
        if not override:
            return self
        given = GateRule.from_json(override)
        return GateRule(
            max_old_drop=_pick(given.max_old_drop, self.max_old_drop),
            min_new_accuracy=_pick(given.min_new_accuracy, self.min_new_accuracy),
        )


@dataclass(frozen=True)
class EvaluationSetInfo:
    id: int
    name: str
    revision: int
    class_names: tuple[str, ...]
    image_counts: tuple[int, ...]
    location: str
    created_at: datetime

    @property
    def image_count(self) -> int:
        return sum(self.image_counts)


@dataclass(frozen=True)
class EvaluationInfo:
    id: int
    version_id: int
    evaluation_set: EvaluationSetInfo
    # The version it was compared with (the parent); None for a first version.
    baseline_id: int | None
    results: dict[str, Any]
    created_at: datetime


class EvaluationSets:
    def __init__(
        self, db: Database, objects: ObjectStore, *, gc_grace_seconds: float = 3600.0
    ) -> None:
        self.db = db
        self.objects = objects
        self.gc_grace_seconds = gc_grace_seconds

    def add(
        self,
        name: str,
        images: Iterable[UploadedImage | ImageStream],
        *,
        class_names: Sequence[str],
        image_counts: Sequence[int],
    ) -> EvaluationSetInfo:
        """Store the images, then record them as the next revision of set `name` (the
        first is 1). The images are saved first, so a recorded set is always whole."""
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(problem.replace("class name", "evaluation set name"))
        names, counts = validate_task(class_names, image_counts, None)
        location = save_images(self.objects, EVALUATION_SETS_ROOT, images)
        try:
            with self.db.write() as session:
                # Adders take turns, so two uploads of one name get two revisions.
                self.db.lock_table(session, EvaluationSet.__tablename__)
                latest = session.scalar(
                    select(func.max(EvaluationSet.revision)).where(EvaluationSet.name == name)
                )
                row = EvaluationSet(
                    name=name,
                    revision=(latest or 0) + 1,
                    class_names=list(names),
                    image_counts=list(counts),
                    location=location,
                    created_at=utcnow(),
                )
                session.add(row)
                session.flush()
                return _set_info(row)
        except BaseException:
            discard_images(self.objects, location)
            raise

    def get(self, set_id: int) -> EvaluationSetInfo:
        with self.db.read() as session:
            row = session.get(EvaluationSet, set_id)
            if row is None:
                raise EvaluationSetNotFoundError(set_id)
            return _set_info(row)

    def list(self, *, latest_only: bool = False) -> builtins.list[EvaluationSetInfo]:
        """Every set by name, newest revision first; `latest_only`: one per name."""
        query = select(EvaluationSet).order_by(EvaluationSet.name, EvaluationSet.revision.desc())
        with self.db.read() as session:
            rows = [_set_info(row) for row in session.scalars(query)]
        if not latest_only:
            return rows
        latest: dict[str, EvaluationSetInfo] = {}
        for row in rows:
            latest.setdefault(row.name, row)
        return builtins.list(latest.values())

    def load(self, info: EvaluationSetInfo) -> builtins.list[UploadedImage]:
        """The set's images, each checked against its recorded sha256."""
        return load_images(self.objects, info.location)

    def collect_garbage(self, *, grace_seconds: float | None = None) -> builtins.list[str]:
        """Remove stored images no set records (the request that saved them failed)."""

        def referenced() -> set[str]:
            with self.db.read() as session:
                return set(session.scalars(select(EvaluationSet.location)))

        grace = self.gc_grace_seconds if grace_seconds is None else grace_seconds
        return collect_unreferenced(self.objects, EVALUATION_SETS_ROOT, referenced, grace)


class Evaluations:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self, version_id: int, baseline_id: int | None, results: Mapping[int, Mapping[str, Any]]
    ) -> None:
        with self.db.write() as session:
            self.record_in(session, version_id, baseline_id, results)

    def record_in(
        self,
        session: Session,
        version_id: int,
        baseline_id: int | None,
        results: Mapping[int, Mapping[str, Any]],
    ) -> None:
        """Store a version's results ({evaluation set id: results}) inside the caller's
        transaction (e.g. the one that publishes the version)."""
        now = utcnow()
        session.add_all(
            Evaluation(
                version_id=version_id,
                evaluation_set_id=set_id,
                baseline_id=baseline_id,
                results=dict(result),
                created_at=now,
            )
            for set_id, result in results.items()
        )
        session.flush()

    def for_version(self, version_id: int) -> builtins.list[EvaluationInfo]:
        """The version's newest evaluation on each set it was evaluated on, by set name."""
        query = (
            select(Evaluation, EvaluationSet)
            .join(EvaluationSet, EvaluationSet.id == Evaluation.evaluation_set_id)
            .where(Evaluation.version_id == version_id)
            .order_by(EvaluationSet.name, EvaluationSet.revision.desc(), Evaluation.id.desc())
        )
        newest: dict[int, EvaluationInfo] = {}
        with self.db.read() as session:
            for row, evaluation_set in session.execute(query).tuples():
                if row.evaluation_set_id not in newest:
                    newest[row.evaluation_set_id] = EvaluationInfo(
                        id=row.id,
                        version_id=row.version_id,
                        evaluation_set=_set_info(evaluation_set),
                        baseline_id=row.baseline_id,
                        results=dict(row.results),
                        created_at=row.created_at,
                    )
        return builtins.list(newest.values())


def _set_info(row: EvaluationSet) -> EvaluationSetInfo:
    return EvaluationSetInfo(
        id=row.id,
        name=row.name,
        revision=row.revision,
        class_names=tuple(row.class_names),
        image_counts=tuple(row.image_counts),
        location=row.location,
        created_at=row.created_at,
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def _pick(given: float | None, default: float | None) -> float | None:
    return default if given is None else given
