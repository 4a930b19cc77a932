"""`Store`: every part of the store built from one `StoreSettings`."""

from __future__ import annotations

from dataclasses import dataclass

from store.api_keys import ApiKeys
from store.db import Database, Timeouts, upgrade_database
from store.evaluations import Evaluations, EvaluationSets
from store.garbage import GarbageLedger
from store.jobs import Jobs
from store.objects import ObjectStore, make_object_store
from store.registry import Registry
from store.settings import StoreSettings
from store.tasks import Tasks
from store.uploads import TaskUploads


@dataclass
class Store:
    settings: StoreSettings
    db: Database
    objects: ObjectStore
    registry: Registry
    jobs: Jobs
    tasks: Tasks
    uploads: TaskUploads
    api_keys: ApiKeys
    garbage: GarbageLedger
    evaluation_sets: EvaluationSets
    evaluations: Evaluations

    @classmethod
    def open(
        cls,
        settings: StoreSettings | None = None,
        *,
        upgrade: bool = False,
        objects: ObjectStore | None = None,
    ) -> Store:
        """Connect to the database and object store; `upgrade` applies migrations first."""
        settings = settings or StoreSettings()
        db = Database.from_url(
            settings.database_url, echo=settings.database_echo, timeouts=Timeouts.of(settings)
        )
        if upgrade:
            upgrade_database(db.engine)
        objects = objects or make_object_store(settings)
        jobs = Jobs(db)
        return cls(
            settings=settings,
            db=db,
            objects=objects,
            registry=Registry(db, objects, gc_grace_seconds=settings.gc_grace_seconds),
            jobs=jobs,
            tasks=jobs.tasks,
            uploads=TaskUploads(
                objects,
                jobs,
                keep_uploads=settings.keep_uploads,
                gc_grace_seconds=settings.gc_grace_seconds,
            ),
            api_keys=ApiKeys(db),
            garbage=GarbageLedger(db),
            evaluation_sets=EvaluationSets(db, objects, gc_grace_seconds=settings.gc_grace_seconds),
            evaluations=Evaluations(db),
        )

    def collect_garbage(self, *, grace_seconds: float | None = None) -> list[str]:
        """Remove unreferenced version blobs, task uploads and evaluation set images;
        return the removed keys."""
        return (
            self.registry.collect_garbage(grace_seconds=grace_seconds)
            + self.uploads.collect_garbage(grace_seconds=grace_seconds)
            + self.evaluation_sets.collect_garbage(grace_seconds=grace_seconds)
        )

    def close(self) -> None:
        self.db.dispose()
