from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dmc_core.backbone import Backbone, BackboneSpec, load_backbone
from dmc_core.learner import Learner, TaskError
from tests.core.toy import COLOUR_NAMES, FAMILIES, colour_images, fast_config


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _model_snapshot(learner: Learner) -> dict[str, torch.Tensor]:
    """Parameters and buffers (batch-norm statistics must not move either)."""
    return {k: v.detach().clone() for k, v in learner.backbone.model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def _accuracy(learner: Learner, classes: list[int], offset: int) -> float:
    images, labels = colour_images(classes, 15, seed=99)
    predictions = learner.predict(images, top_k=1)
    return sum(p.indices[0] == y + offset for p, y in zip(predictions, labels, strict=True)) / len(
        labels
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_trains_only_the_adapter_and_stage2_only_the_prompts(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    learner = Learner(backbone_factory(family), fast_config("dmc_ot"))
    images, labels = colour_images([0, 1], 12, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    model_before = _model_snapshot(learner)
    after_stage1: dict[str, dict[str, torch.Tensor]] = {}

    def progress(stage: str, step: int, total: int) -> None:
        if stage == "memory":
            after_stage1["model"] = _model_snapshot(learner)
            after_stage1["prompts"] = _snapshot(learner.prompts)

    images, labels = colour_images([2, 3], 12, seed=1)
    prompts_before = _snapshot(learner.prompts)
    learner.learn_task(images, labels, ["blue", "yellow"], progress=progress)
    model_after, prompts_after = _model_snapshot(learner), _snapshot(learner.prompts)

    stage1_changed = _changed(model_before, after_stage1["model"])
    assert stage1_changed and all(".lora_" in k for k in stage1_changed)
    # The new task's tokens appear at the start of the task; nothing prompt-side trains in stage 1.
    assert not _changed(prompts_before, {k: after_stage1["prompts"][k] for k in prompts_before})
    assert not _changed(after_stage1["model"], model_after)
    stage2_changed = _changed(after_stage1["prompts"], prompts_after)
    assert stage2_changed == {"ctx", "task_tokens.1"}
    text_keys = [k for k in model_before if not k.startswith("visual.")]
    assert text_keys and not _changed(
        {k: model_before[k] for k in text_keys}, {k: model_after[k] for k in text_keys}
    )


@pytest.fixture(scope="module")
def two_task_accuracy(checkpoints: dict[str, BackboneSpec]) -> dict[str, tuple[float, float]]:
    """(old task, new task) accuracy after two 3-class tasks, per method."""
    schedule = {"stage1.epochs": 3, "stage1.batch_size": 8, "stage2.epochs": 10}
    variants = {
        "dmc": fast_config("dmc", **schedule),
        "dmc_ot": fast_config("dmc_ot", **schedule),
        "finetune": fast_config("dmc", **schedule, **{"stage2.samples_per_old_class": 0}),
    }
    results = {}
    for name, config in variants.items():
        learner = Learner(load_backbone(checkpoints["dmc-tiny-vit"]), config)
        for task, classes in enumerate(([0, 1, 2], [3, 4, 5])):
            images, labels = colour_images(classes, 20, seed=task)
            learner.learn_task(images, labels, [COLOUR_NAMES[k] for k in classes])
        results[name] = (_accuracy(learner, [0, 1, 2], 0), _accuracy(learner, [3, 4, 5], 3))
    return results


@pytest.mark.parametrize("method", ["dmc", "dmc_ot"])
def test_old_task_survives_where_finetuning_forgets(
    method: str, two_task_accuracy: dict[str, tuple[float, float]]
) -> None:
    old, new = two_task_accuracy[method]
    finetune_old, finetune_new = two_task_accuracy["finetune"]
    assert finetune_new >= 0.9  # fine-tuning learns the new task ...
    assert finetune_old <= 0.2  # ... and forgets the old one
    assert old >= 0.6 and old - finetune_old >= 0.5
    assert new >= 0.6


def test_progress_covers_every_stage_in_order(backbone_factory: Callable[[str], Backbone]) -> None:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot"))
    events: list[tuple[str, int, int]] = []
    for task, classes in enumerate(([0, 1], [2, 3])):
        events.clear()
        images, labels = colour_images(classes, 10, seed=task)
        report = learner.learn_task(
            images, labels, [f"c{k}" for k in classes], progress=lambda *e: events.append(e)
        )
    stages = [e[0] for e in events]
    assert stages[0] == "encode" and stages[-1] == "stage2"
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["encode", "stage1", "encode", "memory", "stage2"]
    for stage in ("stage1", "stage2"):
        steps = [(step, total) for s, step, total in events if s == stage]
        assert [s for s, _ in steps] == list(range(1, len(steps) + 1))
        assert steps[-1][0] == steps[-1][1]
    assert report.calibration is not None and report.calibration["method"] == "sinkhorn"
    assert report.images_per_class == {"c2": 10, "c3": 10}


def test_dmc_does_not_calibrate(backbone_factory: Callable[[str], Backbone]) -> None:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc"))
    for classes in ([0, 1], [2, 3]):
        images, labels = colour_images(classes, 8, seed=0)
        report = learner.learn_task(images, labels, [f"c{k}" for k in classes])
    assert report.calibration is None
    assert len(learner.prompts.task_tokens) == 0


@pytest.mark.parametrize(
    ("names", "labels", "message"),
    [
        ([], [], "at least one class"),
        (["red", " "], [0, 0, 1, 1], "must not be empty"),
        (["red", "red"], [0, 0, 1, 1], "repeat within the task"),
        (["known", "new"], [0, 0, 1, 1], "already learned"),
        (["a", "b"], [0, 0, 0, 1], "'b' has 1 images"),
        (["a", "b"], [0, 0, 1, 2], r"labels must be in \[0, 2\)"),
    ],
)
def test_bad_tasks_are_refused_and_change_nothing(
    names: list[str],
    labels: list[int],
    message: str,
    backbone_factory: Callable[[str], Backbone],
) -> None:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc"))
    images, first_labels = colour_images([0, 1], 4, seed=0)
    learner.learn_task(images, first_labels, ["known", "other"])
    before = _snapshot(learner.prompts)
    images, _ = colour_images([2] * max(len(labels), 1), 1, seed=0)
    with pytest.raises(TaskError, match=message):
        learner.learn_task(images[: len(labels)], labels, names)
    assert learner.class_names == ["known", "other"]
    assert not _changed(before, _snapshot(learner.prompts))


def test_predict_returns_sorted_top_k(backbone_factory: Callable[[str], Backbone]) -> None:
    learner = Learner(backbone_factory("dmc-tiny-cnn-bert"), fast_config("dmc_ot"))
    with pytest.raises(TaskError, match="no class"):
        learner.predict(colour_images([0], 1, seed=0)[0])
    images, labels = colour_images([0, 1, 2], 6, seed=0)
    learner.learn_task(images, labels, ["red", "green", "blue"])
    predictions = learner.predict(images[:4], top_k=2)
    assert len(predictions) == 4
    for p in predictions:
        assert len(p.names) == 2 and p.probabilities[0] >= p.probabilities[1]
        assert set(p.names) <= {"red", "green", "blue"}
    assert len(learner.predict(images[:1], top_k=10)[0].names) == 3
