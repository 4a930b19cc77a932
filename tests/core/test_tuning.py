"""bench/tune.py's trials: one run per method and trial on the validation split, resumed,
tabulated with the best trial of each method marked."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from dmc_core.experiment.config import ExperimentError
from dmc_core.experiment.tuning import TuningGrid, collect_trials, run_trials, tuning_table
from tests.core.test_experiment import FAST_LEARNER


def _experiment(path: Path, **overrides: Any) -> Path:
    """A tiny Fashion-MNIST experiment (random tiny model, two tasks) written to `path`."""
    experiment = {
        "name": "tune",
        "dataset": {"name": "fashion_mnist", "train_per_class": 4, "test_per_class": 3},
        "backbone": {"name": "dmc-tiny-vit", "pretrained": None},
        "protocol": "B0-Inc5",
        "seeds": [1],
        "methods": ["joint"],
        "learner": FAST_LEARNER,
        "evaluation": {"feature_cache": None},
        "threads": 1,
        **overrides,
    }
    path.write_text(yaml.safe_dump(experiment))
    return path


def test_trials_run_on_validation_resume_and_tabulate(tmp_path: Path) -> None:
    config = _experiment(
        tmp_path / "exp.yaml",
        seeds=[1, 2],
        methods=["zeroshot", "finetune"],
        method_overrides={"finetune": {"stage2": {"epochs": 1}}},
    )
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "seed": 3,
                "validation_per_class": 2,
                "methods": ["finetune"],
                "trials": {"default": [{"stage1.epochs": 0}, {"stage1": {"epochs": 1}}]},
            }
        )
    )
    grid = TuningGrid.load(grid_file)
    out = tmp_path / "tune"
    run_trials(config, grid, out, show_progress=False)
    for index, epochs in enumerate((0, 1)):
        saved = yaml.safe_load((out / "finetune" / f"trial{index}" / "config.yaml").read_text())
        assert saved["seeds"] == [3] and saved["methods"] == ["finetune"]
        assert saved["evaluation"]["split"] == "validation"
        # The trial's setting joins the experiment's own overrides of the method.
        assert saved["method_overrides"]["finetune"] == {
            "stage2": {"epochs": 1},
            "stage1": {"epochs": epochs},
        }
    collected = collect_trials(grid, out)
    rows = collected["finetune"]
    assert [r["settings"] for r in rows] == [{"stage1.epochs": 0}, {"stage1.epochs": 1}]
    assert all(r["last"] is not None for r in rows)
    best = [r for r in rows if r.get("best")]
    assert len(best) == 1 and best[0]["last"] == max(r["last"] for r in rows)
    # Running again resumes the finished trials: the same results.
    run_trials(config, grid, out, show_progress=False)
    assert collect_trials(grid, out) == collected
    table = tuning_table(collected)
    assert "| finetune | 2 of 2 |" in table
    assert f"**Last {best[0]['last']:.1f}" in table

    missing = tuning_table(collect_trials(grid, tmp_path / "nothing"))
    assert "| finetune | 0 of 2 |" in missing and "not run" in missing
    shutil.rmtree(out / "finetune" / "trial1")
    half = collect_trials(grid, out)["finetune"]
    assert half[0]["last"] is not None and not any(r.get("best") for r in half)


def test_grid_errors(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"seed": 1, "validation_per_class": 2, "methods": ["dmc"]}))
    with pytest.raises(ExperimentError, match="trials"):
        TuningGrid.load(path)
    path.write_text(
        yaml.safe_dump(
            {"seed": 1, "validation_per_class": 2, "methods": ["dmc"], "trials": {"joint": [{}]}}
        )
    )
    with pytest.raises(ExperimentError, match="no trials for 'dmc'"):
        TuningGrid.load(path)


def test_repo_grid_gives_every_method_the_same_number_of_trials() -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "tuning" / "fashion_mnist_standin.yaml"
    grid = TuningGrid.load(path)
    assert len({len(grid.trials_of(m)) for m in grid.methods}) == 1


def test_joint_last_is_its_last_task_alone(tmp_path: Path) -> None:
    """Why the grid tunes joint on one task of all classes (`method_sets`)."""
    from dmc_core.experiment.config import load_experiment_config
    from dmc_core.experiment.runner import run_experiment

    config = _experiment(tmp_path / "exp.yaml")
    lasts = []
    for protocol in ("B0-Inc5", "B0-Inc10"):
        loaded = load_experiment_config(config, [f"protocol={protocol}"])
        run = run_experiment(loaded, tmp_path / protocol, show_progress=False)["runs"][0]
        report = run["task_reports"][-1]
        lasts.append((run["metrics"]["last"], report["stage1_loss"], report["stage2_loss"]))
    assert lasts[0] == lasts[1]
