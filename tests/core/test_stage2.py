"""Stage 2's replay schedule: METHOD.md's per-class one, and the bounded one."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from dmc_core.backbone import Backbone
from dmc_core.config import Stage2Config
from dmc_core.learner import Learner, replay_counts, stage2_batches
from tests.core.toy import colour_images, fast_config

NEW_IMAGES_PER_CLASS = 8
BATCH = 16
EPOCHS = 2
N_S = 32


class _Calls:
    """What one task's stage 2 did: its steps, text-tower passes and replay draws."""

    def __init__(self) -> None:
        self.stage2_steps: list[tuple[int, int]] = []
        self.text_passes = 0
        self.samples: dict[int, int] = {}


def _learn_after_old_classes(backbone: Backbone, n_old: int, **overrides: Any) -> _Calls:
    """Learn two colour classes on top of `n_old` old classes made directly in the memory."""
    config = fast_config(
        "dmc",
        **{
            "stage1.epochs": 0,
            "stage2.epochs": EPOCHS,
            "stage2.batch_size": BATCH,
            "stage2.samples_per_old_class": N_S,
            **overrides,
        },
    )
    learner = Learner(backbone, config)
    generator = torch.Generator().manual_seed(0)
    learner.prompts.add_task([f"old class {i}" for i in range(n_old)])
    dim = int(learner.prompts().shape[1])
    for c in range(n_old):
        learner.memory.add_class(c, torch.randn(6, dim, generator=generator))

    calls = _Calls()
    encode = learner.text_tower.encode_embeddings
    sample_classes = learner.memory.sample_classes

    def counting_encode(*args: Any) -> torch.Tensor:
        calls.text_passes += 1
        return encode(*args)

    def counting_sample(
        classes: list[int], n: int, gen: torch.Generator, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for c in classes:
            calls.samples[c] = calls.samples.get(c, 0) + n
        return sample_classes(classes, n, gen, **kwargs)

    setattr(learner.text_tower, "encode_embeddings", counting_encode)  # noqa: B010
    setattr(learner.memory, "sample_classes", counting_sample)  # noqa: B010

    def progress(stage: str, step: int, total: int) -> None:
        if stage == "stage2":
            calls.stage2_steps.append((step, total))

    images, labels = colour_images([0, 1], NEW_IMAGES_PER_CLASS, seed=0)
    learner.learn_task(images, labels, ["red", "green"], progress=progress)
    return calls


def test_bounded_schedule_does_not_grow_with_old_classes(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    few = _learn_after_old_classes(backbone_factory("dmc-tiny-vit"), 20)
    many = _learn_after_old_classes(backbone_factory("dmc-tiny-vit"), 200)
    n_new = 2 * NEW_IMAGES_PER_CLASS
    bound = EPOCHS * math.ceil(n_new / BATCH)
    assert len(few.stage2_steps) == len(many.stage2_steps) == bound
    assert few.stage2_steps[-1] == (bound, bound)
    # One text-tower pass per stage-2 step over all classes, plus one for the train accuracy.
    assert few.text_passes == many.text_passes == bound + 1
    assert sum(many.samples.values()) == sum(few.samples.values())
    assert sum(many.samples.values()) == EPOCHS * Stage2Config.replay_ratio * n_new


def test_bounded_schedule_balances_real_and_replayed_classes(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    """Few old classes: each gets as many samples as a new class has images, not N_s."""
    calls = _learn_after_old_classes(backbone_factory("dmc-tiny-vit"), 3)
    assert calls.samples == {c: EPOCHS * NEW_IMAGES_PER_CLASS for c in range(3)}
    assert len(calls.stage2_steps) == EPOCHS * math.ceil(2 * NEW_IMAGES_PER_CLASS / BATCH)


@pytest.mark.parametrize("n_old", [4, 20])
def test_per_class_schedule_is_method_md(
    n_old: int, backbone_factory: Callable[[str], Backbone]
) -> None:
    calls = _learn_after_old_classes(
        backbone_factory("dmc-tiny-vit"), n_old, **{"stage2.replay": "per_class"}
    )
    assert calls.samples == {c: EPOCHS * N_S for c in range(n_old)}
    steps = EPOCHS * math.ceil((2 * NEW_IMAGES_PER_CLASS + N_S * n_old) / BATCH)
    assert len(calls.stage2_steps) == steps
    assert calls.text_passes == steps + 1


def test_bounded_counts_spread_evenly_and_vary_by_epoch() -> None:
    cfg = Stage2Config(samples_per_old_class=256, replay_ratio=1.0)
    generator = torch.Generator().manual_seed(0)
    # 10 new classes of 16 images: a budget of 160 samples over 300 old classes.
    epochs = [replay_counts(cfg, 300, [16] * 10, generator) for _ in range(2)]
    for counts in epochs:
        assert int(counts.sum()) == 160
        assert set(counts.tolist()) == {0, 1}
    assert not torch.equal(epochs[0], epochs[1])
    # Under the budget: each old class weighs like a new class (ceil of the mean count).
    assert replay_counts(Stage2Config(), 5, [10, 13], generator).tolist() == [12] * 5
    assert int(replay_counts(Stage2Config(samples_per_old_class=0), 5, [8], generator).sum()) == 0


def test_bounded_batches_share_new_and_replay_evenly() -> None:
    generator = torch.Generator().manual_seed(0)
    order, sizes = stage2_batches(Stage2Config(), 40, 150, 3, generator)
    assert sorted(order.tolist()) == list(range(190))
    batches = order.split(sizes)
    assert [int((b < 40).sum()) for b in batches] == [14, 13, 13]
    assert [int((b >= 40).sum()) for b in batches] == [50, 50, 50]
    per_class = Stage2Config(replay="per_class", batch_size=64)
    assert stage2_batches(per_class, 40, 150, 0, generator)[1] == [64, 64, 62]
