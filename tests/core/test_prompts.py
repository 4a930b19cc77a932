from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dmc_core.backbone import Backbone
from dmc_core.config import PromptConfig
from dmc_core.prompts import PromptLearner
from dmc_core.text import text_tower_for
from tests.core.toy import FAMILIES

CLASSES = ["cat", "ankle boot", "t-shirt", "golden retriever"]


@pytest.mark.parametrize("family", FAMILIES)
def test_untrained_prompts_equal_the_hand_written_prompt(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    prompts = PromptLearner(text_tower_for(backbone.model, backbone.tokenizer), PromptConfig(), 0)
    prompts.add_task(CLASSES[:2])
    prompts.add_task(CLASSES[2:])
    with torch.no_grad():
        learned = prompts()
        reference = backbone.model.encode_text(
            backbone.tokenizer([f"a photo of a {name}." for name in CLASSES])
        )
    assert learned.shape == reference.shape
    torch.testing.assert_close(learned, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_class_uses_the_tokens_of_its_task(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    prompts = PromptLearner(tower, PromptConfig(task_tokens=4), 4)
    assert prompts.add_task(CLASSES[:2]) == 0
    assert prompts.add_task(CLASSES[2:]) == 1
    assert prompts.class_tasks == [0, 0, 1, 1]
    with torch.no_grad():
        before = prompts()
        prompts.task_tokens[0].add_(torch.randn(prompts.task_tokens[0].shape))
        after = prompts()
    assert not torch.allclose(before[:2], after[:2], atol=1e-4)
    torch.testing.assert_close(before[2:], after[2:], atol=0, rtol=0)


def test_trainable_parameters_are_context_and_newest_task(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    prompts = PromptLearner(text_tower_for(backbone.model, backbone.tokenizer), PromptConfig(), 4)
    prompts.add_task(["a"])
    prompts.add_task(["b"])
    trainable = prompts.trainable_parameters(train_old_task_tokens=False)
    assert trainable[0] is prompts.ctx and trainable[1] is prompts.task_tokens[1]
    assert len(trainable) == 2
    assert len(prompts.trainable_parameters(train_old_task_tokens=True)) == 3


def test_context_init_must_match_its_length(backbone_factory: Callable[[str], Backbone]) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    with pytest.raises(ValueError, match="is 3 tokens"):
        PromptLearner(tower, PromptConfig(ctx_init="a photo of", n_ctx=4), 0)
