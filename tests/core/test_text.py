from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dmc_core.backbone import Backbone
from dmc_core.learner import Learner
from dmc_core.text import RealLength, text_tower_for
from tests.core.toy import FAMILIES, colour_images, fast_config

NAMES = ["cat", "ankle boot", "golden retriever", "t-shirt"]


def _full_context(ids: torch.Tensor) -> int:
    return int(ids.shape[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_trimmed_text_tower_gives_the_untrimmed_features(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    tower = text_tower_for(backbone.model, backbone.tokenizer)
    ids = tower.tokenize([f"a photo of a {name}." for name in NAMES])
    with torch.no_grad():
        trimmed = tower.encode_embeddings(tower.embed_tokens(ids), ids)
        reference = backbone.model.encode_text(ids)
    assert tower.real_length(ids) < ids.shape[1]  # type: ignore[attr-defined]
    torch.testing.assert_close(trimmed, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_those_of_the_full_context(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    learner = Learner(backbone_factory(family), fast_config("dmc_ot", **{"stage2.epochs": 1}))
    images, labels = colour_images([0, 1], 4, seed=0)
    learner.learn_task(images, labels, NAMES[:2])
    images, labels = colour_images([2, 3], 4, seed=1)
    learner.learn_task(images, labels, NAMES[2:])
    pixels = learner.preprocess(colour_images([0, 1, 2, 3], 2, seed=2)[0])
    trimmed = learner.logits(pixels)
    assert learner.text_tower.real_length(learner.prompts.token_ids) < 32  # type: ignore[attr-defined]

    learner.text_tower.real_length = _full_context  # type: ignore[attr-defined]
    learner._prototypes = None
    full = learner.logits(pixels)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=0)


def test_real_length_is_the_longest_row_and_follows_changes() -> None:
    ids = torch.tensor([[5, 7, 9, 0, 0, 0], [5, 9, 0, 0, 0, 0]])
    length = RealLength(pad_id=0)
    assert length(ids) == 3
    assert length(ids) == 3  # remembered
    ids[1, 4] = 8  # changed in place: measured again
    assert length(ids) == 5
    assert length(ids[:, :2].clone()) == 2
    assert length(torch.zeros(2, 6, dtype=torch.long)) == 1
    assert length(torch.zeros(0, 6, dtype=torch.long)) == 6
