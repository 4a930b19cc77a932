"""Run an experiment: every method on every seed, task by task, evaluated after each task.

The run folder:

```
OUT/config.yaml          the resolved configuration (a resumed run must match it)
OUT/results.json         config, seeds, environment, accuracy matrices, metrics, timings
OUT/results.md           the table (mean ± std over seeds)
OUT/accuracy.png         accuracy after each task, one line per method
OUT/log.txt              the one-line summary of every task
OUT/progress/<method>-seed<seed>/partial.json    finished tasks of one run (atomic)
OUT/progress/<method>-seed<seed>/state-task<t>/  the learner after task t (until the run ends)
```

Resume: after each task the learner state is written first, then `partial.json` (by an
atomic rename) that points to it; older states go only after that. A run killed at any
point therefore continues from its last finished task with the state that task left, and
everything a task draws at random is seeded from (learner seed, task index), so the
resumed run ends with exactly the results of an uninterrupted one.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dmc_core.backbone import Backbone, load_backbone
from dmc_core.calibration import mean_alignment
from dmc_core.data.images import ClassificationDataset, Split
from dmc_core.data.registry import DatasetError, get_dataset
from dmc_core.experiment.config import ExperimentConfig, ExperimentError
from dmc_core.experiment.environment import environment
from dmc_core.experiment.features import FeatureCache, hash_indices
from dmc_core.experiment.methods import Method, TaskData, get_method_class
from dmc_core.experiment.metrics import aggregate, compute_metrics
from dmc_core.experiment.protocol import Protocol, class_order, split_tasks
from dmc_core.files import atomic_write

__all__ = ["Event", "ExperimentRunner", "SeedPlan", "make_plan", "run_experiment"]

RESULTS_FORMAT = 1
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
PARTIAL_FILE = "partial.json"


@dataclass(frozen=True)
class Event:
    """What the runner is doing; hooks get one per learner progress step and per task."""

    kind: Literal["task_start", "progress", "evaluate", "task_end"]
    method: str
    seed: int
    task: int
    stage: str | None = None
    step: int = 0
    total: int = 0


Hook = Callable[[Event], None]


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


def _task_data(dataset: ClassificationDataset, plan: SeedPlan, t: int) -> TaskData:
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


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class _StageBars:
    """One tqdm bar per phase of a task (encode, stage1, memory, stage2, evaluate, ...)."""

    def __init__(self, prefix: str, enabled: bool) -> None:
        self.prefix, self.enabled = prefix, enabled
        self.stage: str | None = None
        self.bar: tqdm[Any] | None = None

    def __call__(self, stage: str, step: int, total: int) -> None:
        if not self.enabled:
            return
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(
                total=total, desc=f"{self.prefix} {stage}", leave=False, file=sys.stderr
            )
        if self.bar.total != total:
            self.bar.total = total
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.stage = None, None


class ExperimentRunner:
    """Runs one configured experiment into a folder; see the module docstring."""

    def __init__(
        self,
        config: ExperimentConfig,
        out: Path,
        *,
        resume: bool = False,
        hook: Hook | None = None,
        show_progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.out = Path(out)
        self.resume = resume
        self.hook = hook or (lambda event: None)
        self.show_progress = show_progress
        self._log = log if log is not None else (lambda line: tqdm.write(line))
        self.cache = FeatureCache(
            Path(config.evaluation.feature_cache) if config.evaluation.feature_cache else None
        )
        self.setup_seconds: dict[str, float] = {}
        self._pristine: Backbone | None = None
        self._dataset: ClassificationDataset | None = None

    # ------------------------------------------------------------------ set-up
    def log(self, line: str) -> None:
        self._log(line)
        with (self.out / "log.txt").open("a") as file:
            file.write(line + "\n")

    def _prepare_folder(self) -> None:
        resolved = self.config.to_dict()
        path = self.out / CONFIG_FILE
        existing = path.is_file() or (self.out / "progress").exists()
        if existing and not self.resume:
            raise ExperimentError(
                f"{self.out} already holds a run: pass --resume to continue it, or choose "
                "another --out folder"
            )
        if existing and path.is_file():
            saved = yaml.safe_load(path.read_text())
            if saved != yaml.safe_load(yaml.safe_dump(resolved)):
                diff = _differences(saved, resolved)
                raise ExperimentError(
                    f"{self.out} was started with another configuration; differences: "
                    f"{diff[:8]}. Resume with the same config and --set options."
                )
        self.out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(resolved, sort_keys=False)
        atomic_write(path, lambda tmp: tmp.write_text(text))

    @property
    def dataset(self) -> ClassificationDataset:
        if self._dataset is None:
            timer = time.perf_counter()
            spec = self.config.dataset
            try:
                self._dataset = get_dataset(spec.name, **spec.options)
            except DatasetError as error:
                raise ExperimentError(f"dataset: {error}") from error
            self.setup_seconds["load_dataset"] = time.perf_counter() - timer
        return self._dataset

    def _fresh_backbone(self) -> Backbone:
        """A copy of the pretrained backbone (adapters attach in place, so each learner
        needs its own)."""
        if self._pristine is None:
            timer = time.perf_counter()
            device = self.config.base_learner_config().device
            # Models without weights (tiny test configs) get the same random init every time.
            torch.manual_seed(0)
            self._pristine = load_backbone(
                self.config.backbone.spec(),
                device=device,
                cache_dir=self.config.backbone.cache_path(),
            )
            if self.config.backbone.channels_last:
                self._pristine.model.visual.to(memory_format=torch.channels_last)
            self.setup_seconds["load_backbone"] = time.perf_counter() - timer
        # Only the model is copied: the tokenizer and transforms are shared, read-only.
        return dataclasses.replace(self._pristine, model=copy.deepcopy(self._pristine.model))

    # -------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> dict[str, Any]:
        started = time.perf_counter()
        # Refuse a bad dataset or protocol before anything is written.
        dataset = self.dataset
        plans = [make_plan(self.config, dataset, seed) for seed in self.config.seeds]
        self._prepare_folder()
        n_tasks = len(plans[0].tasks)
        self.log(
            f"{self.config.name}: {dataset.name} ({dataset.n_classes} classes), "
            f"{self.config.protocol} -> {n_tasks} tasks, seeds {self.config.seeds}, "
            f"methods {self.config.methods}"
        )
        for plan in plans:
            for method in self.config.methods:
                if self._run_one(method, plan):
                    # Partial results after every finished run, for a look while it goes on.
                    partial = self.results(plans, complete=False, wall=0.0)
                    _write_json(self.out / RESULTS_FILE, partial)
        results = self.results(plans, complete=True, wall=time.perf_counter() - started)
        self._write_outputs(results)
        if not self.config.keep_states:
            for path in (self.out / "progress").glob("*/state-task*"):
                shutil.rmtree(path, ignore_errors=True)
        self.log(
            f"done in {results['seconds']['wall_this_invocation']:.1f} s "
            f"(compute {results['seconds']['compute_total']:.1f} s); results in {self.out}"
        )
        return results

    def _progress_dir(self, method: str, seed: int) -> Path:
        return self.out / "progress" / f"{method}-seed{seed}"

    def _load_partial(self, method: str, plan: SeedPlan) -> dict[str, Any]:
        path = self._progress_dir(method, plan.seed) / PARTIAL_FILE
        fresh = {
            "method": method,
            "seed": plan.seed,
            "n_tasks": len(plan.tasks),
            "completed": 0,
            "state": None,
            "tasks": [],
        }
        if not path.is_file():
            return fresh
        partial: dict[str, Any] = json.loads(path.read_text())
        for record in partial["tasks"]:
            if record["classes"] != plan.tasks[record["task"]]:
                raise ExperimentError(
                    f"{path} was written for other task classes; start a new run folder"
                )
        return partial

    def _run_one(self, method_name: str, plan: SeedPlan) -> bool:
        """Run (the rest of) one method on one seed; False if it was already finished."""
        dataset = self.dataset
        folder = self._progress_dir(method_name, plan.seed)
        partial = self._load_partial(method_name, plan)
        n_tasks = len(plan.tasks)
        if partial["completed"] >= n_tasks:
            return False
        folder.mkdir(parents=True, exist_ok=True)
        config = self.config.learner_config(method_name, plan.seed)
        method = get_method_class(method_name)(self._fresh_backbone, config)
        seen = [_task_data(dataset, plan, t) for t in range(partial["completed"])]
        if partial["completed"]:
            state = folder / partial["state"] if partial["state"] else None
            method.restore(state, seen)
            self.log(f"{method_name} seed {plan.seed}: resumed after task {partial['completed']}")
        diagnose = method_name in self.config.evaluation.diagnostics
        for t in range(partial["completed"], n_tasks):
            record = self._run_task(method, plan, t, seen, diagnose)
            timer = time.perf_counter()
            state_name = f"state-task{t}"
            saved = method.save(folder / state_name)
            record["seconds"]["save"] = time.perf_counter() - timer
            partial["tasks"].append(record)
            partial["completed"] = t + 1
            partial["state"] = state_name if saved else None
            _write_json(folder / PARTIAL_FILE, partial)
            for old in folder.glob("state-task*"):
                if old.name != partial["state"]:
                    shutil.rmtree(old, ignore_errors=True)
            self.log(_summary_line(method_name, plan, t, partial))
            self.hook(Event("task_end", method_name, plan.seed, t))
        return True

    def _run_task(
        self, method: Method, plan: SeedPlan, t: int, seen: list[TaskData], diagnose: bool
    ) -> dict[str, Any]:
        name, seed = method.name, plan.seed
        self.hook(Event("task_start", name, seed, t))
        task = _task_data(self.dataset, plan, t)
        seen.append(task)
        prefix = f"{name} s{seed} t{t + 1}/{len(plan.tasks)}"
        bars = _StageBars(prefix, self.show_progress)

        def progress(stage: str, step: int, total: int) -> None:
            bars(stage, step, total)
            self.hook(Event("progress", name, seed, t, stage, step, total))

        before = self._memory_means(method) if diagnose else None
        timer = time.perf_counter()
        try:
            report = method.learn(task, seen, progress)
        finally:
            bars.close()
        seconds: dict[str, Any] = {"learn": time.perf_counter() - timer}
        if report is not None:
            seconds["learn_stages"] = report.seconds

        timer = time.perf_counter()
        self.hook(Event("evaluate", name, seed, t))
        encoder = method.encoder_id()
        correct = self._evaluate(method, plan, t, encoder, prefix)
        seconds["evaluate"] = time.perf_counter() - timer

        diagnostics = None
        if before:
            timer = time.perf_counter()
            diagnostics = self._diagnose(method, plan, t, before, encoder, prefix)
            seconds["diagnostics"] = time.perf_counter() - timer
        return {
            "task": t,
            "classes": plan.tasks[t],
            "class_names": task.class_names,
            "correct": correct,
            "encoder": encoder,
            "report": report.to_dict() if report is not None else None,
            "diagnostics": diagnostics,
            "seconds": seconds,
        }

    # ------------------------------------------------------------- evaluation
    def _features(
        self,
        method: Method,
        encoder: str,
        split: Split,
        split_name: str,
        classes: Sequence[int],
        indices: dict[int, np.ndarray],
        desc: str,
    ) -> dict[int, torch.Tensor]:
        """Features of each class's images under the method's current encoder (cached)."""
        batch_size = self.config.evaluation.batch_size
        learner_config = method.config
        base = {
            "backbone": self.config.backbone.spec().id,
            "channels_last": self.config.backbone.channels_last,
            "precision": learner_config.precision,
            "device": torch.device(learner_config.device).type,
            "encoder": encoder,
            "dataset": self.dataset.fingerprint,
            "split": split_name,
            "transform": repr(method.preprocess),
            "batch_size": batch_size,
        }
        parts = {c: {**base, "class": c, "images": hash_indices(indices[c])} for c in classes}
        missing = [c for c in classes if not self.cache.contains(FeatureCache.key(parts[c]))]
        total = sum(len(indices[c]) for c in missing)
        bar = tqdm(
            total=total,
            desc=desc,
            unit="img",
            leave=False,
            file=sys.stderr,
            disable=not self.show_progress or total == 0,
        )

        def encode(c: int) -> torch.Tensor:
            images = split.images.subset(indices[c])
            chunks = []
            for start in range(0, len(images), batch_size):
                batch = [images[i] for i in range(start, min(start + batch_size, len(images)))]
                pixels = torch.stack([method.preprocess(image) for image in batch])
                chunks.append(method.encode(pixels))
                bar.update(len(batch))
            return torch.cat(chunks)

        try:
            return {
                c: self.cache.get_or_compute(parts[c], functools.partial(encode, c))
                for c in classes
            }
        finally:
            bar.close()

    def _evaluate(
        self, method: Method, plan: SeedPlan, t: int, encoder: str, prefix: str
    ) -> list[int]:
        """correct[j] for every task j <= t, over all classes seen so far."""
        split = self.dataset.split(plan.eval_split)
        classes = [c for task in plan.tasks[: t + 1] for c in task]
        features = self._features(
            method, encoder, split, plan.eval_split, classes, plan.eval_index, f"{prefix} evaluate"
        )
        n_seen = len(classes)
        correct = []
        for task in plan.tasks[: t + 1]:
            right = 0
            for c in task:
                scores = method.logits(features[c])
                if scores.shape[1] != n_seen:
                    raise RuntimeError(
                        f"{method.name} scores {scores.shape[1]} classes, {n_seen} are seen"
                    )
                right += int((scores.argmax(dim=1) == plan.positions[c]).sum())
            correct.append(right)
        return correct

    @staticmethod
    def _memory_means(method: Method) -> dict[int, torch.Tensor] | None:
        learner = method.learner
        if learner is None or len(learner.memory) == 0:
            return None
        return {c: learner.memory.mean(c) for c in learner.memory.class_indices}

    def _diagnose(
        self,
        method: Method,
        plan: SeedPlan,
        t: int,
        before: dict[int, torch.Tensor],
        encoder: str,
        prefix: str,
    ) -> dict[str, Any]:
        """METHOD.md's diagnostic: cosine between each old class's memory mean and its true
        mean under the new encoder (its train images), before and after calibration."""
        learner = method.learner
        assert learner is not None
        old = sorted(before)
        seen = [c for task in plan.tasks[: t + 1] for c in task]
        dataset_ids = [seen[p] for p in old]
        features = self._features(
            method,
            encoder,
            self.dataset.train,
            "train",
            dataset_ids,
            plan.train_index,
            f"{prefix} diagnose",
        )
        true = torch.stack([features[c].double().mean(dim=0) for c in dataset_ids])
        stale = torch.stack([before[p] for p in old])
        calibrated = torch.stack([learner.memory.mean(p) for p in old])
        cos_before = mean_alignment(stale, true)
        cos_after = mean_alignment(calibrated, true)
        dist_before = torch.linalg.vector_norm(stale - true, dim=1)
        dist_after = torch.linalg.vector_norm(calibrated - true, dim=1)
        return {
            "classes": dataset_ids,
            "cosine_before": cos_before.tolist(),
            "cosine_after": cos_after.tolist(),
            "mean_cosine_before": float(cos_before.mean()),
            "mean_cosine_after": float(cos_after.mean()),
            "distance_before": dist_before.tolist(),
            "distance_after": dist_after.tolist(),
            "mean_distance_before": float(dist_before.mean()),
            "mean_distance_after": float(dist_after.mean()),
        }

    # ---------------------------------------------------------------- results
    def results(self, plans: list[SeedPlan], *, complete: bool, wall: float) -> dict[str, Any]:
        dataset = self.dataset
        runs = []
        for plan in plans:
            for method in self.config.methods:
                path = self._progress_dir(method, plan.seed) / PARTIAL_FILE
                if path.is_file():
                    runs.append(_run_record(json.loads(path.read_text()), plan))
        summary = {
            method: aggregate([r["metrics"] for r in runs if r["method"] == method])
            for method in self.config.methods
            if any(r["method"] == method for r in runs)
        }
        per_method = {
            method: sum(r["seconds"]["total"] for r in runs if r["method"] == method)
            for method in self.config.methods
        }
        compute = sum(per_method.values()) + sum(self.setup_seconds.values())
        return {
            "format_version": RESULTS_FORMAT,
            "name": self.config.name,
            "complete": complete,
            "config": self.config.to_dict(),
            "seeds": list(self.config.seeds),
            "methods": list(self.config.methods),
            "protocol": self.config.protocol,
            "n_tasks": len(plans[0].tasks),
            "dataset": {
                "name": dataset.name,
                "n_classes": dataset.n_classes,
                "class_names": dataset.class_names,
                "fingerprint": dataset.fingerprint,
                "eval_split": self.config.evaluation.split,
            },
            "environment": environment(),
            "runs": runs,
            "summary": summary,
            "seconds": {
                "setup": dict(self.setup_seconds),
                "per_method": per_method,
                "compute_total": compute,
                "wall_this_invocation": wall,
            },
            "feature_cache": self.cache.stats(),
        }

    def _write_outputs(self, results: dict[str, Any]) -> None:
        from dmc_core.experiment.report import write_run_outputs

        _write_json(self.out / RESULTS_FILE, results)
        write_run_outputs(results, self.out)


def _run_record(partial: dict[str, Any], plan: SeedPlan) -> dict[str, Any]:
    records = partial["tasks"]
    counts = plan.eval_counts()
    correct = [r["correct"] for r in records]
    metrics = compute_metrics(correct, counts)
    task_seconds = [r["seconds"] for r in records]
    phases = ("learn", "evaluate", "diagnostics", "save")
    total = sum(s.get(phase, 0.0) for s in task_seconds for phase in phases)
    return {
        "method": partial["method"],
        "seed": partial["seed"],
        "completed_tasks": partial["completed"],
        "class_order": plan.order,
        "tasks": plan.tasks,
        "task_class_names": [r["class_names"] for r in records],
        "eval_counts": counts,
        "correct": correct,
        "metrics": metrics,
        "diagnostics": [r["diagnostics"] for r in records],
        "task_reports": [r["report"] for r in records],
        "seconds": {"total": total, "per_task": task_seconds},
    }


def _summary_line(method: str, plan: SeedPlan, t: int, partial: dict[str, Any]) -> str:
    counts = plan.eval_counts()
    correct = [r["correct"] for r in partial["tasks"]]
    metrics = compute_metrics(correct, counts)
    record = partial["tasks"][-1]
    old = metrics["old_accuracy"][-1]
    seconds = record["seconds"]
    parts = [
        f"{method:<9} seed {plan.seed} task {t + 1}/{len(plan.tasks)}",
        f"+{record['class_names']}",
        f"acc {metrics['accuracy_per_task'][-1]:5.1f}",
        f"old {old:5.1f}" if old is not None else "old   -  ",
        f"new {metrics['new_accuracy'][-1]:5.1f}",
    ]
    diagnostics = record.get("diagnostics")
    if diagnostics:
        parts.append(
            f"align {diagnostics['mean_cosine_before']:.3f}->{diagnostics['mean_cosine_after']:.3f}"
        )
    parts.append(f"(learn {seconds['learn']:.1f} s, eval {seconds['evaluate']:.1f} s)")
    return "  ".join(parts)


def _differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = []
        for key in sorted(set(saved) | set(current), key=str):
            diffs += _differences(saved.get(key), current.get(key), f"{path}{key}.")
        return diffs
    return [] if saved == current else [f"{path.rstrip('.')}: {saved!r} -> {current!r}"]


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    resume: bool = False,
    hook: Hook | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or with `resume`, continue) an experiment into `out`; returns results.json's dict."""
    runner = ExperimentRunner(
        config, out, resume=resume, hook=hook, show_progress=show_progress, log=log
    )
    return runner.run()
