"""One run of a job (see `worker.jobs` for the order of its steps): load the task's images
and the version it builds on, apply the task (its kind's entry in `worker.task_kinds`),
save the state, and publish it together with the job's success."""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from sqlalchemy.orm import Session

from dmc_core.backbone import BackboneError
from dmc_core.errors import DmcError
from dmc_core.learner import Learner, TaskError
from dmc_core.state import save_state
from store.errors import (
    ClassNotFoundError,
    DuplicateClassError,
    JobStateError,
    LeaseLostError,
    StoreError,
    VersionNotFoundError,
)
from store.jobs import JobInfo, TaskInfo
from store.lineage import ClassChange
from store.models import JobState, TaskKind
from store.registry import VersionInfo
from store.service import Store
from worker.errors import (
    CONNECTION_ERRORS,
    JobCancelledError,
    JobFailedError,
    VersionMismatchError,
    WorkerStoppingError,
)
from worker.evaluation import EvaluationRun
from worker.garbage import Scratch
from worker.gate import GateDecision, decide, gate_rule
from worker.heartbeat import Heartbeat, ProgressWriter
from worker.images import decode_task_images
from worker.locking import LockLostError, UpdateLock
from worker.model import build_base_learner, load_learner
from worker.progress import LOAD_PERCENT, PUBLISH_PERCENT, SAVE_PERCENT
from worker.settings import WorkerSettings
from worker.task_kinds import TASK_KINDS

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class JobOutcome:
    """How one run of a job ended, as its runner saw it."""

    job_id: int
    attempt: int
    # SUCCEEDED, FAILED, CANCELLED, QUEUED (handed back: the worker is stopping), or None:
    # the run lost the job (its lock or lease) and left it to whoever holds it now.
    state: JobState | None
    version_id: int | None = None
    error: str | None = None


class JobExecutor:
    """Runs one job at a time for a `JobRunner` (its store, settings, name and stop event)."""

    def __init__(
        self, store: Store, settings: WorkerSettings, name: str, stop: threading.Event
    ) -> None:
        self.store = store
        self.settings = settings
        self.name = name
        self.stop = stop

    def run(self, job: JobInfo, lock: UpdateLock) -> JobOutcome:
        attempt = job.attempts
        jobs = self.store.jobs
        log.info("job %d (task %d): run %d starts on %s", job.id, job.task_id, attempt, self.name)
        heartbeat = Heartbeat(jobs, lock, job.id, attempt, self.settings.job_lease_seconds)
        progress = ProgressWriter(
            jobs,
            job.id,
            attempt,
            lease_seconds=self.settings.job_lease_seconds,
            interval=self.settings.job_progress_interval_seconds,
            heartbeat=heartbeat,
            stop=self.stop,
        )
        scratch = Scratch(job.id, self.settings.work_dir)
        workdir = scratch.path
        heartbeat.start()
        try:
            version = self._learn(job, progress, workdir)
        except JobCancelledError:
            log.info("job %d was cancelled during run %d", job.id, attempt)
            release_uploads(self.store, job.task_id)
            return JobOutcome(job.id, attempt, JobState.CANCELLED)
        except WorkerStoppingError:
            handed_back = _quietly(lambda: jobs.requeue(job.id, attempt=attempt), False)
            log.info("job %d: the worker is stopping; queued again: %s", job.id, handed_back)
            return JobOutcome(job.id, attempt, JobState.QUEUED if handed_back else None)
        except (LeaseLostError, LockLostError) as error:
            # Someone else may own the job now. Hand it back if it is still ours, so the
            # new lock holder need not wait for the lease, and stop running jobs.
            _quietly(lambda: jobs.requeue(job.id, attempt=attempt), False)
            raise LockLostError(f"job {job.id} run {attempt} lost its claim: {error}") from error
        except CONNECTION_ERRORS:
            raise  # the job stays running; it is run again when its lease expires
        except Exception as error:
            message = _failure_message(error)
            if isinstance(error, JobFailedError | TaskError):
                log.warning("job %d failed: %s", job.id, message)
            else:
                log.exception("job %d failed unexpectedly", job.id)
            return self._fail(job, attempt, message)
        finally:
            heartbeat.halt()
            scratch.remove()
            _free_memory()
        log.info("job %d succeeded: version %d", job.id, version.id)
        release_uploads(self.store, job.task_id)
        return JobOutcome(job.id, attempt, JobState.SUCCEEDED, version_id=version.id)

    def _fail(self, job: JobInfo, attempt: int, message: str) -> JobOutcome:
        try:
            self.store.jobs.fail(job.id, message, attempt=attempt)
        except JobStateError:
            # Cancelled meanwhile: the cancel stands.
            release_uploads(self.store, job.task_id)
            return JobOutcome(job.id, attempt, JobState.CANCELLED)
        except LeaseLostError as error:
            raise LockLostError(str(error)) from error
        release_uploads(self.store, job.task_id)
        return JobOutcome(job.id, attempt, JobState.FAILED, error=message)

    def _learn(self, job: JobInfo, progress: ProgressWriter, workdir: Path) -> VersionInfo:
        started = time.perf_counter()
        store = self.store
        progress.phase("load", LOAD_PERCENT)
        task = store.jobs.tasks.get(job.task_id)
        kind = TASK_KINDS[task.kind]
        images, labels = self._images(task) if kind.needs_images else ([], [])
        seconds: dict[str, float] = {"images": time.perf_counter() - started}

        timer = time.perf_counter()
        parent = self._base_version(task)
        learner = self._learner_on(parent, workdir)
        seconds["load_state"] = time.perf_counter() - timer

        old_classes = learner.class_names
        # Only kinds that learn from images are evaluated (and gated): a removal or a
        # rename changes which classes there are, not what is learned of the others.
        evaluation = (
            EvaluationRun.load(
                store, [*old_classes, *task.class_names], max_side=self.settings.max_image_side
            )
            if kind.needs_images
            else EvaluationRun([], max_side=self.settings.max_image_side)
        )
        baseline_stages = evaluation.stages if old_classes else []
        progress.learning(baseline_stages + kind.stages(learner) + evaluation.stages)
        baseline = evaluation.predict(learner, progress) if old_classes else None
        timer = time.perf_counter()
        report = kind.apply(learner, task, images, labels, progress)
        seconds["learn"] = time.perf_counter() - timer
        new_classes = task.class_names if task.kind is TaskKind.ADD else ()
        results = evaluation.results(
            evaluation.predict(learner, progress),
            baseline,
            old_classes=old_classes,
            new_classes=new_classes,
        )
        gate = decide(gate_rule(self.settings, task.gate), results.values())

        progress.phase("save", SAVE_PERCENT)
        timer = time.perf_counter()
        state_dir = workdir / "state"
        save_state(learner, state_dir)
        seconds["save"] = time.perf_counter() - timer
        metrics = _metrics(job, task, learner, report, seconds, started)
        metrics["gate"] = gate.as_json()
        del learner
        _free_memory()

        progress.phase("publish", PUBLISH_PERCENT)

        finalize = functools.partial(_finalize, store, job, results, gate, task.activate)

        try:
            return store.registry.publish(
                state_dir,
                parent_id=parent.id if parent else None,
                metrics=metrics,
                change=ClassChange.of_task(task.kind, task.class_names, task.arguments),
                task_id=task.id,
                activate=task.activate and gate.passed,
                finalize=finalize,
            )
        except JobStateError as error:
            raise JobCancelledError() from error
        except VersionNotFoundError as error:
            raise JobFailedError(
                f"the version this task built on was deleted while its job ran ({error}); "
                "submit the task again"
            ) from error

    def _images(self, task: TaskInfo) -> tuple[list[Image.Image], list[int]]:
        if task.uploads_location is None:
            raise JobFailedError(
                f"the images of task {task.id} are no longer stored, so it cannot be learned; "
                "upload the task again"
            )
        try:
            uploads = self.store.uploads.load(task.uploads_location)
        except StoreError as error:
            raise JobFailedError(
                f"the uploaded images cannot be read back from the object store ({error}); "
                "upload the task again"
            ) from error
        return decode_task_images(uploads, task.class_names, max_side=self.settings.max_image_side)

    def _base_version(self, task: TaskInfo) -> VersionInfo | None:
        """The version the task builds on: the one it names, or the one active now."""
        registry = self.store.registry
        if task.base_version_id is None:
            return registry.active()
        try:
            return registry.get(task.base_version_id)
        except VersionNotFoundError as error:
            raise JobFailedError(
                f"the version this task builds on ({task.base_version_id}) was deleted; "
                "submit the task again"
            ) from error

    def _learner_on(self, parent: VersionInfo | None, workdir: Path) -> Learner:
        if parent is None:
            try:
                return build_base_learner(self.settings)
            except BackboneError as error:
                raise JobFailedError(
                    f"the base model cannot be loaded: {error}. Check the DMC_BACKBONE_* "
                    "settings and that the model files are available to the worker"
                ) from error
        folder = workdir / f"parent-{parent.id}"
        try:
            return load_learner(self.store.registry, parent.id, self.settings, folder)
        except VersionMismatchError as error:
            raise JobFailedError(str(error)) from error
        except (StoreError, DmcError) as error:
            raise JobFailedError(
                f"the version to build on ({parent.id}) cannot be loaded: {error}. Activate "
                "a good version (or delete this one), then submit the task again"
            ) from error


def _finalize(
    store: Store,
    job: JobInfo,
    results: dict[int, dict[str, Any]],
    gate: GateDecision,
    activate: bool,
    session: Session,
    version: VersionInfo,
) -> None:
    """In the publish transaction: the version's evaluations and the job's success (with
    the gate's note when it kept the version from becoming active)."""
    store.evaluations.record_in(session, version.id, version.parent_id, results)
    note = gate.note(version.id) if activate else None
    store.jobs.succeed_in(session, job.id, version.id, attempt=job.attempts, note=note)


def release_uploads(store: Store, task_id: int) -> None:
    """Delete a finished task's uploaded images (logged, not raised, if that fails)."""
    try:
        store.uploads.release(task_id)
    except Exception as error:
        log.warning("could not release the uploads of task %d: %s", task_id, error)


def _failure_message(error: Exception) -> str:
    if isinstance(error, JobFailedError):
        return str(error)
    if isinstance(error, TaskError):
        return f"the task cannot be learned: {error}. Fix the upload and submit it again"
    if isinstance(error, DuplicateClassError):
        return f"{error}; class names must be new, so rename them and upload the task again"
    if isinstance(error, ClassNotFoundError):
        return f"{error}; submit the task again for a version that has the class"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (
            "the GPU ran out of memory while learning the task; lower stage1.batch_size "
            "(DMC_LEARNER_OVERRIDES) or use a larger GPU, then upload the task again"
        )
    detail = str(error) or type(error).__name__
    return (
        f"the update failed unexpectedly ({type(error).__name__}: {detail}); this is not a "
        "problem with the upload itself: see the worker logs, then upload the task again"
    )


def _metrics(
    job: JobInfo,
    task: TaskInfo,
    learner: Learner,
    report: dict[str, Any],
    seconds: dict[str, float],
    started: float,
) -> dict[str, Any]:
    timings = dict(seconds)
    timings.update({f"learn_{k}": v for k, v in report.get("seconds", {}).items()})
    duration = time.perf_counter() - started
    timings["total"] = duration
    metrics = {
        "task_id": task.id,
        "task_kind": task.kind.value,
        "job_id": job.id,
        "attempt": job.attempts,
        "method": learner.config.method,
        "backbone": learner.backbone.spec.id,
        "device": str(learner.device),
        "precision": learner.config.precision,
        "task_index": report.get("task"),
        "images_per_class": report.get("images_per_class", {}),
        "image_count": sum(report.get("images_per_class", {}).values()),
        "train_accuracy": report.get("train_accuracy"),
        "stage1_train_accuracy": report.get("stage1_train_accuracy"),
        "stage1_loss": report.get("stage1_loss"),
        "stage2_loss": report.get("stage2_loss"),
        "calibration": report.get("calibration"),
        "seconds": timings,
        "duration_seconds": duration,
    }
    return _jsonable(metrics)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numbers as float or int, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float) or hasattr(value, "__float__"):
        number = float(value)
        return number if math.isfinite(number) else None
    return json.loads(json.dumps(value, default=str))


def _quietly(action: Callable[[], T], default: T) -> T:
    try:
        return action()
    except Exception as error:
        log.warning("%s", error)
        return default


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
