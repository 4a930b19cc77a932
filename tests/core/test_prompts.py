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


def test_context_no_shorter_than_its_phrase(backbone_factory: Callable[[str], Backbone]) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    with pytest.raises(ValueError, match=r"is 4 tokens, more than prompts\.n_ctx = 3"):
        PromptLearner(tower, PromptConfig(ctx_init="a photo of a", n_ctx=3), 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_longer_and_random_contexts(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    phrase = PromptLearner(tower, PromptConfig(), 0)
    torch.manual_seed(0)
    longer = PromptLearner(tower, PromptConfig(n_ctx=24), 4)
    # The phrase fills the last four slots, next to the class name; the rest is random.
    torch.testing.assert_close(longer.ctx[-4:], phrase.ctx, atol=0, rtol=0)
    head = longer.ctx.detach()[:-4]
    assert head.shape == (20, phrase.width) and 0.01 < float(head.std()) < 0.03
    torch.manual_seed(0)
    random = PromptLearner(tower, PromptConfig(n_ctx=6, ctx_init=None), 0)
    assert random.ctx.shape == (6, phrase.width) and float(random.ctx.detach().std()) < 0.03
    for prompts, n_ctx in ((longer, 24), (random, 6)):
        assert prompts.n_learnable_tokens == n_ctx
        prompts.add_task(CLASSES[:2])
        prompts.add_task(CLASSES[2:])
        with torch.no_grad():
            features = prompts()
        assert features.shape[0] == 4 and torch.isfinite(features).all()
    # Token count of DMC-OT: shared context plus four per task.
    assert longer.n_learnable_tokens == 24 + 4 * 2


def test_task_tokens_start_from_the_previous_tasks(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    prompts = PromptLearner(text_tower_for(backbone.model, backbone.tokenizer), PromptConfig(), 4)
    prompts.add_task(["a"])
    first = prompts.task_tokens[0].detach().clone()
    assert 0 < float(first.std()) < 0.05
    with torch.no_grad():
        prompts.task_tokens[0].add_(1.0)
    prompts.add_task(["b"])
    torch.testing.assert_close(prompts.task_tokens[1], first + 1.0, atol=0, rtol=0)
    assert prompts.task_tokens[1] is not prompts.task_tokens[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_context_features_leave_out_the_task_tokens(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    with torch.no_grad():
        plain = PromptLearner(tower, PromptConfig(), 0).context_features(CLASSES)
        with_tokens = PromptLearner(tower, PromptConfig(), 4)
        with_tokens.add_task(CLASSES)
        template = backbone.model.encode_text(
            backbone.tokenizer([f"a photo of a {name}." for name in CLASSES])
        )
        torch.testing.assert_close(with_tokens.context_features(CLASSES), plain, atol=0, rtol=0)
    torch.testing.assert_close(plain, template, atol=1e-5, rtol=0)
    assert not torch.allclose(with_tokens().detach(), plain, atol=1e-4)
