"""Trials of each method's settings on the validation split, the same number per method.

A grid (YAML, e.g. `bench/tuning/fashion_mnist_standin.yaml`) gives the seed, the
validation split's size and, per method, its trials: each trial is a set of that method's
learner settings (written into `method_overrides`), `default` for every method not listed.

```yaml
seed: 1993
validation_per_class: 100
sets: [evaluation.diagnostics=[]]      # extra `--set`s of every trial
method_sets: {joint: [protocol=B0-Inc10]}   # and of one method's trials
methods: [dmc, dmc_ot, joint]
trials:
  default: [{stage1.epochs: 1}, {stage1.epochs: 2}]
  joint: [{stage1.epochs: 3}, {stage1.epochs: 5}]
```

(`joint` learns each task with a fresh learner, so its Last is that of its last task
alone: one task of all classes, the same images, order and seeds, at a third of the cost.)

Every trial is one run of the experiment (that method, that seed, evaluated on images held
out of train) in its own folder `OUT/<method>/trial<i>`, which a later call resumes; its
learner states are kept (`keep_states`) for inference-only tuning such as
`bench/tune_memory_weight.py`. The table gives each trial's validation Last and Avg and,
once all of a method's trials have run, marks its best by Last.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmc_core.experiment.config import ExperimentError, flatten, load_experiment_config
from dmc_core.experiment.results import CONFIG_FILE, RESULTS_FILE
from dmc_core.experiment.runner import run_experiment

__all__ = ["TuningGrid", "collect_trials", "run_trials", "trial_folder", "tuning_table"]

DEFAULT_TRIALS = "default"


@dataclass
class TuningGrid:
    seed: int
    validation_per_class: int
    methods: list[str]
    trials: dict[str, list[dict[str, Any]]]
    sets: list[str] = field(default_factory=list)
    method_sets: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> TuningGrid:
        data = yaml.safe_load(Path(path).read_text())
        try:
            grid = cls(**data)
        except TypeError as error:
            raise ExperimentError(f"{path}: {error}") from error
        for method in grid.methods:
            if not grid.trials_of(method):
                raise ExperimentError(f"{path}: no trials for {method!r} (and no 'default')")
        return grid

    def trials_of(self, method: str) -> list[dict[str, Any]]:
        return self.trials.get(method, self.trials.get(DEFAULT_TRIALS, []))

    def trial_sets(self, method: str, trial: dict[str, Any]) -> list[str]:
        """The `dmc experiment --set` options that make one trial's run."""
        sets = [
            f"seeds=[{self.seed}]",
            f"methods=[{method}]",
            f"dataset.validation_per_class={self.validation_per_class}",
            "evaluation.split=validation",
            "keep_states=true",
            *self.sets,
            *self.method_sets.get(method, []),
        ]
        return sets + [
            f"method_overrides.{method}.{key}={json.dumps(value)}"
            for key, value in flatten(trial).items()
        ]


def trial_folder(out: Path, method: str, index: int) -> Path:
    return Path(out) / method / f"trial{index}"


def run_trials(
    config_path: Path,
    grid: TuningGrid,
    out: Path,
    methods: Sequence[str] | None = None,
    *,
    show_progress: bool = True,
) -> None:
    """Run (or continue) every trial of `methods` (default: the grid's), one after the other."""
    for method in methods or grid.methods:
        for index, trial in enumerate(grid.trials_of(method)):
            config = load_experiment_config(config_path, grid.trial_sets(method, trial))
            folder = trial_folder(out, method, index)
            resume = (folder / CONFIG_FILE).is_file()
            run_experiment(config, folder, resume=resume, show_progress=show_progress)


def collect_trials(grid: TuningGrid, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Per method, per trial: its settings, validation Last / Avg in % once finished, and
    `best` on the trial with the highest Last once every trial of the method finished."""
    collected: dict[str, list[dict[str, Any]]] = {}
    for method in grid.methods:
        rows = []
        for index, trial in enumerate(grid.trials_of(method)):
            row: dict[str, Any] = {"trial": index, "settings": flatten(trial), "last": None}
            path = trial_folder(out, method, index) / RESULTS_FILE
            if path.is_file():
                results = json.loads(path.read_text())
                runs = [r for r in results["runs"] if r["completed_tasks"] == results["n_tasks"]]
                if runs:
                    metrics = runs[0]["metrics"]
                    row.update(last=metrics["last"], avg=metrics["avg"])
                    row["train_seconds"] = runs[0]["seconds"]["total"]
            rows.append(row)
        if rows and all(r["last"] is not None for r in rows):  # chosen once all have run
            max(rows, key=lambda r: r["last"])["best"] = True
        collected[method] = rows
    return collected


def tuning_table(collected: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown: one row per method, one column per trial (settings: Last / Avg; best bold)."""
    width = max((len(rows) for rows in collected.values()), default=0)
    header = ["method", "trials run", *(f"trial {i + 1}" for i in range(width))]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, rows in collected.items():
        cells = []
        for row in rows:
            settings = ", ".join(f"{k}={v}" for k, v in row["settings"].items())
            if row["last"] is None:
                cells.append(f"{settings}: not run")
                continue
            score = f"Last {row['last']:.1f} / Avg {row['avg']:.1f}"
            cells.append(f"{settings}: **{score}**" if row.get("best") else f"{settings}: {score}")
        done = sum(r["last"] is not None for r in rows)
        cells += [""] * (width - len(rows))
        lines.append("| " + " | ".join([method, f"{done} of {len(rows)}", *cells]) + " |")
    return "\n".join(lines) + "\n"
