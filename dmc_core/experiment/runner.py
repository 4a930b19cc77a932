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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from dmc_core.backbone import Backbone, load_backbone
from dmc_core.data.images import ClassificationDataset
from dmc_core.data.registry import DatasetError, get_dataset
from dmc_core.experiment.config import ExperimentConfig, ExperimentError
from dmc_core.experiment.environment import peak_rss_bytes
from dmc_core.experiment.evaluation import Evaluator
from dmc_core.experiment.features import FeatureCache
from dmc_core.experiment.methods import Method, TaskData, get_method_class
from dmc_core.experiment.plan import SeedPlan, make_plan, task_data
from dmc_core.experiment.results import (
    CONFIG_FILE,
    PARTIAL_FILE,
    RESULTS_FILE,
    collect_results,
    differences,
    summary_line,
    write_json,
)
from dmc_core.files import atomic_write

__all__ = ["Event", "ExperimentRunner", "run_experiment"]


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
                diff = differences(saved, resolved)
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

    @functools.cached_property
    def evaluator(self) -> Evaluator:
        return Evaluator(self.config, self.dataset, self.cache, show_progress=self.show_progress)

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
                    write_json(self.out / RESULTS_FILE, partial)
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
        seen = [task_data(dataset, plan, t) for t in range(partial["completed"])]
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
            write_json(folder / PARTIAL_FILE, partial)
            for old in folder.glob("state-task*"):
                if old.name != partial["state"]:
                    shutil.rmtree(old, ignore_errors=True)
            self.log(summary_line(method_name, plan, t, partial))
            self.hook(Event("task_end", method_name, plan.seed, t))
        return True

    def _run_task(
        self, method: Method, plan: SeedPlan, t: int, seen: list[TaskData], diagnose: bool
    ) -> dict[str, Any]:
        name, seed = method.name, plan.seed
        self.hook(Event("task_start", name, seed, t))
        task = task_data(self.dataset, plan, t)
        seen.append(task)
        prefix = f"{name} s{seed} t{t + 1}/{len(plan.tasks)}"
        bars = _StageBars(prefix, self.show_progress)

        def progress(stage: str, step: int, total: int) -> None:
            bars(stage, step, total)
            self.hook(Event("progress", name, seed, t, stage, step, total))

        before = self.evaluator.memory_means(method) if diagnose else None
        cuda = torch.device(method.config.device).type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timer = time.perf_counter()
        try:
            report = method.learn(task, seen, progress)
        finally:
            bars.close()
        seconds: dict[str, Any] = {"learn": time.perf_counter() - timer}
        # The process's peak so far (it includes earlier tasks and evaluations); the
        # device's is this update's own.
        memory = {
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        }
        if report is not None:
            seconds["learn_stages"] = report.seconds

        timer = time.perf_counter()
        self.hook(Event("evaluate", name, seed, t))
        encoder = method.encoder_id()
        correct = self.evaluator.evaluate(method, plan, t, encoder, prefix)
        seconds["evaluate"] = time.perf_counter() - timer

        diagnostics = None
        if before:
            timer = time.perf_counter()
            diagnostics = self.evaluator.diagnose(method, plan, t, before, encoder, prefix)
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
            "memory": memory,
        }

    # ---------------------------------------------------------------- results
    def results(self, plans: list[SeedPlan], *, complete: bool, wall: float) -> dict[str, Any]:
        return collect_results(
            self.config,
            self.dataset,
            plans,
            self._progress_dir,
            setup_seconds=self.setup_seconds,
            cache=self.cache,
            complete=complete,
            wall=wall,
        )

    def _write_outputs(self, results: dict[str, Any]) -> None:
        from dmc_core.experiment.report import write_run_outputs

        write_json(self.out / RESULTS_FILE, results)
        write_run_outputs(results, self.out)


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
