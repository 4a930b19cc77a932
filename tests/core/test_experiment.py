"""The experiment runner: configs, methods, feature cache, resume, outputs and the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from dmc_core.backbone import BackboneSpec
from dmc_core.config import LearnerConfig
from dmc_core.experiment.config import (
    ExperimentConfig,
    ExperimentError,
    apply_sets,
    load_experiment_config,
)
from dmc_core.experiment.features import FeatureCache
from dmc_core.experiment.methods import get_method_class, list_methods
from dmc_core.experiment.runner import Event, run_experiment
from tests.core.toy import COLOUR_NAMES, colour_images

FAST_LEARNER = {
    "stage1": {"epochs": 1, "batch_size": 8},
    "stage2": {"epochs": 2, "batch_size": 32, "lr": 0.01, "samples_per_old_class": 16},
    "calibration": {"samples_per_class": 16},
    "feature_batch_size": 32,
}


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder dataset: six colour classes, train/ and test/ sub-folders."""
    root = tmp_path_factory.mktemp("colours")
    for split, per_class, seed in (("train", 6, 0), ("test", 3, 1)):
        images, labels = colour_images(list(range(6)), per_class, seed)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / COLOUR_NAMES[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    return root


def _config(folder: Path, spec: BackboneSpec, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "colours",
        "dataset": {"name": "imagefolder", "options": {"root": str(folder)}},
        "backbone": {"name": spec.name, "pretrained": None, "checkpoint": spec.checkpoint},
        "protocol": "B2-Inc2",
        "seeds": [1, 2],
        "methods": ["zeroshot", "finetune", "dmc_ot", "joint"],
        "learner": FAST_LEARNER,
        "evaluation": {"feature_cache": None, "diagnostics": ["dmc_ot"], "batch_size": 5},
        "threads": 1,  # tiny models: one thread is faster, most of all on a busy CPU
    }
    data.update(overrides)
    return data


def _comparable(results: dict[str, Any]) -> dict[str, Any]:
    """Everything but timings and memory."""
    runs = copy.deepcopy(results["runs"])
    for run in runs:
        del run["seconds"], run["memory_per_task"]
        for report in run["task_reports"]:
            if report is not None:
                del report["seconds"]
    return {"runs": runs, "summary": results["summary"]}


class StopError(Exception):
    """Stands for a run killed from outside."""


def test_resume_ends_with_the_results_of_an_uninterrupted_run(
    colour_folder: Path, checkpoints: dict[str, BackboneSpec], tmp_path: Path
) -> None:
    config = ExperimentConfig.from_dict(
        _config(colour_folder, checkpoints["dmc-tiny-vit"], keep_states=True)
    )
    full = run_experiment(config, tmp_path / "full", show_progress=False, log=lambda _: None)
    assert full["complete"] and len(full["runs"]) == 8
    for run in full["runs"]:
        memory = run["memory_per_task"]
        assert len(memory) == 3 and all(m["peak_rss_bytes"] > 2**20 for m in memory)
        assert all(m["peak_device_bytes"] is None for m in memory)  # a CPU run

    out = tmp_path / "interrupted"

    def after_first_task(event: Event) -> None:
        if (event.kind, event.method, event.seed, event.task) == ("task_end", "dmc_ot", 1, 0):
            raise StopError

    def inside_stage2(event: Event) -> None:
        if (event.kind, event.method, event.seed, event.task, event.stage) == (
            "progress",
            "dmc_ot",
            2,
            1,
            "stage2",
        ):
            raise StopError

    def while_evaluating(event: Event) -> None:
        if (event.kind, event.method, event.seed, event.task) == ("evaluate", "joint", 2, 2):
            raise StopError

    quiet: dict[str, Any] = {"show_progress": False, "log": lambda _: None}
    with pytest.raises(StopError):
        run_experiment(config, out, hook=after_first_task, **quiet)
    partial = json.loads((out / "progress" / "dmc_ot-seed1" / "partial.json").read_text())
    assert (
        partial["completed"] == 1 and (out / "progress" / "dmc_ot-seed1" / "state-task0").is_dir()
    )
    with pytest.raises(StopError):
        run_experiment(config, out, resume=True, hook=inside_stage2, **quiet)
    with pytest.raises(StopError):
        run_experiment(config, out, resume=True, hook=while_evaluating, **quiet)
    resumed = run_experiment(config, out, resume=True, **quiet)

    log = (out / "log.txt").read_text()
    assert "dmc_ot    seed 1 task 1/3" in log and "dmc_ot seed 2: resumed after task 1" in log
    assert _comparable(resumed) == _comparable(full)
    for name in ("finetune-seed2", "dmc_ot-seed2"):
        folders = [root / "progress" / name / "state-task2" for root in (tmp_path / "full", out)]
        files = [sorted(p.relative_to(d) for p in d.rglob("*.safetensors")) for d in folders]
        assert files[0] and files[0] == files[1]
        for file in files[0]:
            a, b = (load_file(str(folder / file)) for folder in folders)
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for run in full["runs"]:
        if run["method"] == "dmc_ot":
            first, *later = run["diagnostics"]
            assert first is None and len(later) == 2  # no old classes before task 2
            assert all(-1 <= c <= 1 for d in later for c in d["cosine_after"])
            assert [len(d["classes"]) for d in later] == [2, 4]


def test_run_folder_is_not_overwritten_nor_resumed_with_another_config(
    colour_folder: Path, checkpoints: dict[str, BackboneSpec], tmp_path: Path
) -> None:
    data = _config(colour_folder, checkpoints["dmc-tiny-vit"], methods=["zeroshot"], seeds=[1])
    quiet: dict[str, Any] = {"show_progress": False, "log": lambda _: None}
    run_experiment(ExperimentConfig.from_dict(data), tmp_path, **quiet)
    with pytest.raises(ExperimentError, match="--resume"):
        run_experiment(ExperimentConfig.from_dict(data), tmp_path, **quiet)
    changed = ExperimentConfig.from_dict({**data, "protocol": "B0-Inc3"})
    with pytest.raises(ExperimentError, match="protocol: 'B2-Inc2' -> 'B0-Inc3'"):
        run_experiment(changed, tmp_path, resume=True, **quiet)
    # Resuming a finished run changes nothing.
    before = json.loads((tmp_path / "results.json").read_text())
    again = run_experiment(ExperimentConfig.from_dict(data), tmp_path, resume=True, **quiet)
    assert _comparable(again) == _comparable(before)


def test_zeroshot_encodes_each_test_image_once(
    colour_folder: Path, checkpoints: dict[str, BackboneSpec], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    data = _config(
        colour_folder,
        checkpoints["dmc-tiny-vit"],
        methods=["zeroshot"],
        seeds=[1, 2, 3],
        evaluation={"feature_cache": str(cache), "diagnostics": []},
    )
    quiet: dict[str, Any] = {"show_progress": False, "log": lambda _: None}
    first = run_experiment(ExperimentConfig.from_dict(data), tmp_path / "a", **quiet)
    # Six classes, encoded once; every later evaluation (tasks, seeds) reads the cache.
    assert first["feature_cache"]["misses"] == 6
    assert first["feature_cache"]["hits"] == 3 * (2 + 4 + 6) - 6
    second = run_experiment(ExperimentConfig.from_dict(data), tmp_path / "b", **quiet)
    assert second["feature_cache"]["misses"] == 0
    assert _comparable(second) == _comparable(first)


def test_feature_cache(tmp_path: Path) -> None:
    import torch

    cache = FeatureCache(tmp_path)
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    parts = {"encoder": "abc", "class": 1}
    first = cache.get_or_compute(parts, compute)
    again = FeatureCache(tmp_path).get_or_compute(parts, compute)  # from disk
    assert torch.equal(first, again) and len(calls) == 1
    FeatureCache(tmp_path).get_or_compute({**parts, "encoder": "abd"}, compute)
    assert len(calls) == 2
    memory_only = FeatureCache(None)
    memory_only.get_or_compute(parts, compute)
    memory_only.get_or_compute(parts, compute)
    assert len(calls) == 3 and memory_only.stats()["hits"] == 1


def test_evaluation_scores_across_classes_in_batches(
    colour_folder: Path,
    checkpoints: dict[str, BackboneSpec],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A method scores up to `evaluation.batch_size` images per call, across classes and
    tasks (not one call per class), and the counts per task do not depend on the batching."""
    fecam = get_method_class("fecam")
    calls: list[int] = []
    real_logits = fecam.logits

    def counted(self: Any, features: Any) -> Any:
        calls.append(len(features))
        return real_logits(self, features)

    monkeypatch.setattr(fecam, "logits", counted)
    correct = {}
    for batch_size in (1, 5):
        calls.clear()
        data = _config(
            colour_folder,
            checkpoints["dmc-tiny-vit"],
            seeds=[1],
            methods=["fecam"],
            evaluation={"feature_cache": None, "diagnostics": [], "batch_size": batch_size},
        )
        results = run_experiment(
            ExperimentConfig.from_dict(data),
            tmp_path / str(batch_size),
            show_progress=False,
            log=lambda _: None,
        )
        correct[batch_size] = results["runs"][0]["correct"]
        # Six classes of three test images, two per task: 6, 12 and 18 images scored.
        assert calls == [
            min(batch_size, n - i) for n in (6, 12, 18) for i in range(0, n, batch_size)
        ]
    assert correct[1] == correct[5]
    assert [len(row) for row in correct[5]] == [1, 2, 3]


NEW_ROWS = [
    "simplecil",
    "fecam",
    "dmc_capacity_matched",
    "dmc_calibration_only",
    "dmc_tokens_only",
    "dmc_ot_retrained_tokens",
    "dmc_ot_memory_fused",
]


def test_every_row_runs_and_resumes(
    colour_folder: Path, checkpoints: dict[str, BackboneSpec], tmp_path: Path
) -> None:
    overrides = {"dmc_capacity_matched": {"prompts": {"n_ctx": 8}}}
    config = ExperimentConfig.from_dict(
        _config(
            colour_folder,
            checkpoints["dmc-tiny-vit"],
            seeds=[1],
            methods=NEW_ROWS,
            method_overrides=overrides,
        )
    )
    results = run_experiment(config, tmp_path / "run", show_progress=False, log=lambda line: None)
    assert list(results["summary"]) == NEW_ROWS
    for summary in results["summary"].values():
        assert summary["last"]["n"] == 1 and summary["forgetting_pycil"]["n"] == 1
    # The baselines classify training-free and resume by re-reading the tasks.
    partial = tmp_path / "run" / "progress" / "fecam-seed1" / "partial.json"
    data = json.loads(partial.read_text())
    data["completed"], data["tasks"] = 1, data["tasks"][:1]
    partial.write_text(json.dumps(data))
    (tmp_path / "run" / "results.json").unlink()
    resumed = run_experiment(
        config, tmp_path / "run", resume=True, show_progress=False, log=lambda line: None
    )
    assert resumed["summary"]["fecam"] == results["summary"]["fecam"]
    report = (tmp_path / "run" / "results.md").read_text()
    assert "Forgetting (PyCIL)" in report and "| dmc_ot_memory_fused |" in report


def test_methods_registry_and_settings() -> None:
    assert list_methods()[:4] == ["zeroshot", "finetune", "dmc", "dmc_ot"]
    assert set(NEW_ROWS) | {"joint"} <= set(list_methods())
    base = LearnerConfig(method="dmc")
    calibration_only = get_method_class("dmc_calibration_only").learner_config(base)
    assert calibration_only.uses_calibration and not calibration_only.uses_task_tokens
    tokens_only = get_method_class("dmc_tokens_only").learner_config(base)
    assert tokens_only.uses_task_tokens and not tokens_only.uses_calibration
    assert not tokens_only.prompts.train_old_task_tokens
    retrained = get_method_class("dmc_ot_retrained_tokens").learner_config(base)
    assert retrained.uses_calibration and retrained.prompts.train_old_task_tokens
    fused = get_method_class("dmc_ot_memory_fused").learner_config(base)
    assert fused.uses_calibration and fused.inference.memory_weight == 1.0
    chosen = base.with_overrides({"inference.memory_weight": 0.3})
    assert (
        get_method_class("dmc_ot_memory_fused").learner_config(chosen).inference.memory_weight
        == 0.3
    )
    with pytest.raises(ValueError, match="unknown method 'ewc'; known: zeroshot"):
        get_method_class("ewc")
    base = LearnerConfig(method="dmc_ot")
    finetune = get_method_class("finetune").learner_config(base)
    assert finetune.method == "dmc" and finetune.stage2.samples_per_old_class == 0
    assert not finetune.uses_calibration and not finetune.uses_task_tokens
    assert get_method_class("dmc").learner_config(base).method == "dmc"
    assert get_method_class("dmc_ot").learner_config(LearnerConfig(method="dmc")).uses_calibration
    assert get_method_class("joint").learner_config(LearnerConfig(method="dmc")).method == "dmc_ot"


def _minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": "x", "dataset": {"name": "fashion_mnist"}}
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 3}, r"unknown key\(s\) \['epochs'\] in config"),
        ({"dataset": {"name": "fashion_mnist", "size": 3}}, r"unknown key\(s\) \['size'\]"),
        ({"methods": ["dmc", "ewc"]}, "unknown method 'ewc'"),
        ({"methods": ["dmc", "dmc"]}, "without repeats"),
        ({"seeds": []}, "seeds must be"),
        ({"seeds": ["a"]}, "seeds must be"),
        ({"protocol": "10 tasks"}, "B<base>-Inc<increment>"),
        ({"learner": {"seed": 3}}, "use `seeds`"),
        ({"learner": {"stage1": {"epoch": 3}}}, r"learner: unknown config key 'stage1.epoch'"),
        ({"method_overrides": {"joint": {"bogus": 1}}}, "method_overrides.joint"),
        ({"evaluation": {"diagnostics": ["zeroshot"]}}, "keeps no Gaussian memory"),
        ({"evaluation": {"split": "validation"}}, "validation_per_class"),
    ],
)
def test_config_errors(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ExperimentError, match=message):
        ExperimentConfig.from_dict(_minimal(**overrides))


def test_sets_and_learner_configs(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_minimal(learner={"stage1": {"epochs": 5}})))
    config = load_experiment_config(
        path,
        [
            "learner.stage2.epochs=1",
            "seeds=[7, 8]",
            "dataset.options.invert=false",
            "method_overrides.dmc_ot.calibration.method=bures",
        ],
    )
    assert config.seeds == [7, 8] and config.dataset.options == {"invert": False}
    learner = config.learner_config("dmc_ot", 8)
    assert (learner.stage1.epochs, learner.stage2.epochs, learner.seed) == (5, 1, 8)
    assert learner.calibration.method == "bures"
    assert config.learner_config("dmc", 7).calibration.method == "sinkhorn"
    with pytest.raises(ExperimentError, match="key=value"):
        apply_sets({}, ["seeds"])
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment_config(tmp_path / "missing.yaml")


def test_repo_configs_load() -> None:
    configs = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        config = load_experiment_config(path)
        assert (
            config.methods[:3] == ["zeroshot", "finetune", "dmc"] or "simplecil" in config.methods
        )


def test_cli_end_to_end(tmp_path: Path) -> None:
    from dmc_cli.main import app

    config = {
        "name": "cli",
        "dataset": {"name": "fashion_mnist", "train_per_class": 4, "test_per_class": 3},
        "backbone": {"name": "dmc-tiny-vit", "pretrained": None},
        "protocol": "B0-Inc5",
        "seeds": [1],
        "methods": ["zeroshot", "finetune", "dmc_ot"],
        "learner": FAST_LEARNER,
        "evaluation": {"feature_cache": str(tmp_path / "cache")},
        "threads": 1,
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()
    for seed in (1, 2):
        out = tmp_path / f"run{seed}"
        args = ["experiment", str(path), "--set", f"seeds=[{seed}]", "--out", str(out)]
        result = runner.invoke(app, [*args, "--no-progress"])
        assert result.exit_code == 0, result.output
        assert "| dmc_ot |" in result.output
        for name in ("results.json", "results.md", "accuracy.png", "config.yaml", "log.txt"):
            assert (out / name).is_file(), name
        results = json.loads((out / "results.json").read_text())
        assert results["seeds"] == [seed] and results["n_tasks"] == 2
        assert results["environment"]["versions"]["torch"]
        assert results["runs"][0]["metrics"]["accuracy_matrix"][0][1] is None
        assert not list((out / "progress").glob("*/state-task*"))  # states go at the end
    result = runner.invoke(
        app,
        ["report", str(tmp_path / "run1"), str(tmp_path / "run2"), "--out", str(tmp_path / "rep")],
    )
    assert result.exit_code == 0, result.output
    assert "| dmc_ot |" in result.output and "| 1, 2 |" in result.output
    assert (tmp_path / "rep" / "report.png").stat().st_size > 1000
    merged = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [g["seeds"] for g in merged["groups"]] == [[1, 2]] * 3

    bad_out = tmp_path / "bad"
    bad = runner.invoke(
        app, ["experiment", str(path), "--set", "dataset.name=cifar10", "--out", str(bad_out)]
    )
    assert bad.exit_code == 2 and "unknown dataset 'cifar10'" in bad.output
    assert not bad_out.exists()  # nothing written for a run that cannot start


def test_none_calibrator_leaves_the_memory_alone() -> None:
    import torch

    from dmc_core.calibration import get_calibrator
    from dmc_core.memory import GaussianMemory

    memory = GaussianMemory()
    memory.add_class(0, torch.randn(8, 4, generator=torch.Generator().manual_seed(0)))
    mean, cov = memory.mean(0), memory.covariance(0)
    features = torch.randn(6, 4)
    report = get_calibrator("none").calibrate(
        memory, features, features + 1, torch.zeros(6, dtype=torch.long), torch.Generator()
    )
    assert report.method == "none" and report.class_indices == [0]
    assert torch.equal(memory.mean(0), mean) and torch.equal(memory.covariance(0), cov)
