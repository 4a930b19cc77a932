"""Extend, remove and rename classes on a `Learner` (no service): exact statistics,
predictions without removed classes, renamed prompts, and states that save and reload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dmc_core.backbone import Backbone
from dmc_core.learner import Learner, TaskError
from dmc_core.memory import GaussianMemory, MemoryConfig
from dmc_core.state import load_state, save_state
from tests.core.toy import colour_images, fast_config

FAMILY = "dmc-tiny-vit"


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [MemoryConfig(), MemoryConfig(shrinkage="none"), MemoryConfig(shrinkage="below_dim")],
    ids=["ledoit_wolf", "none", "below_dim"],
)
def test_merging_a_class_equals_one_pass_over_all_its_features(config: MemoryConfig) -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=generator) * 2 + 1
    b = torch.randn(9, 12, generator=generator) + 3
    merged, one_pass = GaussianMemory(config), GaussianMemory(config)
    merged.add_class(0, a)
    merged.merge_class(0, b)
    one_pass.add_class(0, torch.cat([a, b]))
    assert merged.count(0) == one_pass.count(0) == 39
    _close(merged.mean(0), one_pass.mean(0))
    _close(merged.covariance(0), one_pass.covariance(0))
    # Saved and loaded, the merge statistics survive: a second merge is still exact.
    c = torch.randn(5, 12, generator=generator) - 1
    reloaded = GaussianMemory.from_state_dict(merged.state_dict(), config)
    reloaded.merge_class(0, c)
    one_pass = GaussianMemory(config)
    one_pass.add_class(0, torch.cat([a, b, c]))
    _close(reloaded.covariance(0), one_pass.covariance(0))


def _learner(backbone_factory: Callable[[str], Backbone], method: str) -> Learner:
    # No stage 1: the encoder stays the same, so statistics compare to one pass.
    return Learner(backbone_factory(FAMILY), fast_config(method, **{"stage1.epochs": 0}))


@pytest.mark.parametrize("method", ["dmc", "dmc_ot"])
def test_extend_gives_the_statistics_of_one_pass_over_both_image_sets(
    backbone_factory: Callable[[str], Backbone], method: str
) -> None:
    images_a, labels_a = colour_images([0, 1], 8, seed=0)
    images_b, labels_b = colour_images([1], 6, seed=1)
    extended = _learner(backbone_factory, method)
    extended.learn_task(images_a, labels_a, ["red", "green"])
    prompts_before = extended.prompts.ctx.detach().clone()
    extended.extend_classes(images_b, labels_b, ["green"])
    assert not torch.equal(prompts_before, extended.prompts.ctx)  # stage 2 ran

    together = _learner(backbone_factory, method)
    both = images_a + images_b
    together.learn_task(both, labels_a + [1] * len(images_b), ["red", "green"])
    for index in (0, 1):
        assert extended.memory.count(index) == together.memory.count(index)
        _close(extended.memory.mean(index), together.memory.mean(index))
        _close(extended.memory.covariance(index), together.memory.covariance(index))
    assert extended.class_names == ["red", "green"]
    assert extended.n_tasks == 1


def test_extend_refuses_unknown_classes_and_leaves_the_learner_as_it_was(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    learner = _learner(backbone_factory, "dmc_ot")
    images, labels = colour_images([0, 1], 6, seed=0)
    learner.learn_task(images, labels, ["red", "green"])
    with pytest.raises(TaskError, match="not learned"):
        learner.extend_classes(images[:6], labels[:6], ["purple"])
    assert learner.memory.count(0) == 6


def test_remove_then_rename_then_save_and_reload(
    backbone_factory: Callable[[str], Backbone], tmp_path: Path
) -> None:
    learner = _learner(backbone_factory, "dmc_ot")
    first, first_labels = colour_images([0, 1], 6, seed=0)
    learner.learn_task(first, first_labels, ["red", "green"])
    second, second_labels = colour_images([2], 6, seed=1)
    learner.learn_task(second, second_labels, ["blue"])
    blue_mean = learner.memory.mean(2)

    learner.remove_classes(["blue"])  # the last task loses all its classes
    learner.remove_classes(["red"])
    assert learner.class_names == ["green"]
    assert learner.memory.class_indices == [0]
    predictions = learner.predict(second, top_k=5)
    assert {n for p in predictions for n in p.names} == {"green"}

    learner.rename_class("green", "lime")
    assert learner.class_names == ["lime"] and learner.memory.count(0) == 6
    with pytest.raises(TaskError, match="exists already"):
        learner.rename_class("lime", "lime")

    # A class of a removed name can be learned again, as a new task.
    learner.learn_task(second, second_labels, ["blue"])
    assert learner.class_names == ["lime", "blue"] and learner.n_tasks == 3
    _close(learner.memory.mean(1), blue_mean)  # same encoder (no stage 1): same statistics

    save_state(learner, tmp_path / "state")
    reloaded = load_state(tmp_path / "state")
    assert reloaded.class_names == ["lime", "blue"]
    assert reloaded.n_tasks == 3
    probe, _ = colour_images([1, 2], 3, seed=5)
    assert [p.names for p in reloaded.predict(probe)] == [p.names for p in learner.predict(probe)]
