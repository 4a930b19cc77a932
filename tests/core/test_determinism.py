from __future__ import annotations

from collections.abc import Callable

import torch

from dmc_core.backbone import Backbone
from dmc_core.learner import Learner
from dmc_core.state import state_tensors
from tests.core.toy import colour_images, fast_config


def _run(backbone: Backbone, seed: int) -> dict[str, torch.Tensor]:
    learner = Learner(backbone, fast_config("dmc_ot", seed=seed))
    for task, classes in enumerate(([0, 1], [2, 3])):
        images, labels = colour_images(classes, 8, seed=task)
        learner.learn_task(images, labels, [f"colour {k}" for k in classes])
    return state_tensors(learner)


def test_same_seed_gives_identical_state(backbone_factory: Callable[[str], Backbone]) -> None:
    first = _run(backbone_factory("dmc-tiny-vit"), seed=5)
    second = _run(backbone_factory("dmc-tiny-vit"), seed=5)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    other = _run(backbone_factory("dmc-tiny-vit"), seed=6)
    assert any(not torch.equal(first[k], other[k]) for k in first)
