from __future__ import annotations

import threading
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
    # The new task's tokens appear only in stage 2; nothing prompt-side trains in stage 1.
    assert set(after_stage1["prompts"]) == set(prompts_before) == {"ctx", "task_tokens.0"}
    assert not _changed(prompts_before, after_stage1["prompts"])
    assert not _changed(after_stage1["model"], model_after)
    # Stage 2: the shared context and the new task's tokens; the old task's stay frozen.
    assert set(prompts_after) == {"ctx", "task_tokens.0", "task_tokens.1"}
    assert _changed(after_stage1["prompts"], prompts_after) == {"ctx"}
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


@pytest.mark.parametrize("family", FAMILIES)
def test_dmc_ot_stage1_is_dmc_stage1(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    """Task tokens play no part in stage 1: at the first task DMC-OT's anchors are DMC's
    (the template), and its stage-1 loss on the same data and seed is DMC's."""
    images, labels = colour_images([0, 1, 2], 8, seed=0)
    names = ["red", "green", "blue"]
    reports, anchors = {}, {}
    for method in ("dmc", "dmc_ot"):
        learner = Learner(backbone_factory(family), fast_config(method, seed=5))
        anchors[method] = learner._anchor_features(names)[0]
        reports[method] = learner.learn_task(images, labels, names)
    backbone = backbone_factory(family)
    with torch.no_grad():
        template = backbone.model.encode_text(
            backbone.tokenizer([f"a photo of a {n}." for n in names])
        )
    torch.testing.assert_close(anchors["dmc_ot"], anchors["dmc"], atol=0, rtol=0)
    torch.testing.assert_close(
        anchors["dmc"], torch.nn.functional.normalize(template, dim=-1), atol=1e-5, rtol=0
    )
    assert reports["dmc_ot"].stage1_loss == reports["dmc"].stage1_loss
    assert reports["dmc_ot"].stage1_train_accuracy == reports["dmc"].stage1_train_accuracy


class StopLearningError(Exception):
    """Stands for a failure (or a kill) part-way through a task."""


@pytest.mark.parametrize("stage", ["stage1", "memory", "stage2"])
def test_a_task_that_fails_midway_changes_nothing(
    stage: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot"))
    first, first_labels = colour_images([0, 1], 10, seed=0)
    learner.learn_task(first, first_labels, ["red", "green"])
    adapter = _model_snapshot(learner)
    prompts = _snapshot(learner.prompts)
    memory = {c: (learner.memory.mean(c), learner.memory.covariance(c)) for c in (0, 1)}
    scores = learner.predict(first[:4])

    def fail(at: str, step: int, total: int) -> None:
        if at == stage and step == total:
            raise StopLearningError

    images, labels = colour_images([2, 3], 10, seed=1)
    with pytest.raises(StopLearningError):
        learner.learn_task(images, labels, ["blue", "yellow"], progress=fail)
    assert learner.class_names == ["red", "green"] and learner.n_tasks == 1
    assert learner.memory.class_indices == [0, 1]
    for c, (mean, cov) in memory.items():
        assert torch.equal(learner.memory.mean(c), mean)
        assert torch.equal(learner.memory.covariance(c), cov)
    assert set(_snapshot(learner.prompts)) == set(prompts)
    assert not _changed(prompts, _snapshot(learner.prompts))
    assert not _changed(adapter, _model_snapshot(learner))
    assert learner.predict(first[:4]) == scores
    # The task learns afterwards exactly as if the failure had never happened.
    again = learner.learn_task(images, labels, ["blue", "yellow"])
    fresh = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot"))
    fresh.learn_task(first, first_labels, ["red", "green"])
    reference = fresh.learn_task(images, labels, ["blue", "yellow"])
    assert (again.stage1_loss, again.stage2_loss) == (reference.stage1_loss, reference.stage2_loss)


def test_memory_fused_inference_rescues_a_weak_text_side(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    """With nothing trained, the random tiny text tower barely separates the colours; the
    memory's class statistics of the same encoder do."""
    untrained = {"stage1.epochs": 0, "stage2.epochs": 0}
    learner = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc_ot", **untrained))
    classes = [0, 1, 2, 3, 4, 5]
    images, labels = colour_images(classes, 12, seed=0)
    learner.learn_task(images, labels, COLOUR_NAMES)
    text_only = _accuracy(learner, classes, 0)
    accuracy = {}
    # The random tower's features are close in angle: cosine scores need a larger weight,
    # FeCAM's scores of normalised features a much larger one.
    for score, weight in (("cosine", 10.0), ("mahalanobis", 1.0), ("fecam", 1000.0)):
        learner.config.inference.memory_score = score  # type: ignore[assignment]
        learner.config.inference.memory_weight = weight
        accuracy[score] = _accuracy(learner, classes, 0)
    assert text_only <= 0.5
    assert min(accuracy.values()) >= 0.9, accuracy
    # The cached scorer follows the settings it depends on.
    learner.config.memory.shrink_alpha1 = 0.5
    assert learner.memory_scorer().shrink == (0.5, learner.config.memory.shrink_alpha2)
    learner.config.inference.memory_weight = 0.0
    assert _accuracy(learner, classes, 0) == text_only


def test_a_task_learns_while_another_learner_predicts_in_a_thread(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    """The embedded mode: a server thread predicts with a merged learner while the job
    thread trains another one. parametrize's weight cache is process-wide, so predicting
    must not switch it on under the trainer's feet."""
    serving = Learner(backbone_factory("dmc-tiny-vit"), fast_config("dmc"))
    images, labels = colour_images([0, 1], 8, seed=0)
    serving.learn_task(images, labels, ["colour 0", "colour 1"])
    serving.merge_for_inference()
    pixels = serving.preprocess(images).repeat(8, 1, 1, 1)  # long calls: the cache is on

    stop = threading.Event()
    predictions = 0

    def predict_until_stopped() -> None:
        nonlocal predictions
        while not stop.is_set():
            serving.logits(pixels)
            predictions += 1

    thread = threading.Thread(target=predict_until_stopped)
    thread.start()
    try:
        learner = Learner(
            backbone_factory("dmc-tiny-vit"), fast_config("dmc", **{"stage1.epochs": 6})
        )
        for task in range(2):
            classes = [2 + 2 * task, 3 + 2 * task]
            images, labels = colour_images(classes, 16, seed=task)
            report = learner.learn_task(images, labels, [f"colour {c}" for c in classes])
    finally:
        stop.set()
        thread.join()
    assert predictions > 0
    assert report.stage1_loss is not None and report.train_accuracy is not None
