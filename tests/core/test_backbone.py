from __future__ import annotations

from pathlib import Path

import pytest
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.timm_model import TimmModel
from PIL import Image

from dmc_core.backbone import BackboneError, BackboneSpec, load_backbone, save_checkpoint
from tests.core.toy import FAMILIES


def _outputs(spec: BackboneSpec) -> tuple[torch.Tensor, torch.Tensor]:
    backbone = load_backbone(spec)
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    tokens = backbone.tokenizer(["a photo of a cat.", "a dress", "x"])
    with torch.no_grad():
        return backbone.model.encode_image(pixels), backbone.model.encode_text(tokens)


def test_families_are_the_two_open_clip_kinds() -> None:
    vit = load_backbone("dmc-tiny-vit")
    cnn = load_backbone("dmc-tiny-cnn-bert")
    assert type(vit.model) is CLIP
    assert isinstance(cnn.model, CustomTextCLIP)
    assert isinstance(cnn.model.visual, TimmModel)
    assert isinstance(cnn.model.text, HFTextEncoder)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_gives_identical_outputs(family: str, tmp_path: Path) -> None:
    torch.manual_seed(123)
    model = load_backbone(family).model
    path = tmp_path / "model.pt"
    digest = save_checkpoint(model, path)
    assert len(digest) == 64
    image_a, text_a = _outputs(BackboneSpec(family, checkpoint=str(path)))
    image_b, text_b = _outputs(BackboneSpec(family, checkpoint=str(path)))
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
    # ... and they are the saved model's outputs, not a fresh random init.
    torch.manual_seed(999)
    image_c, _ = _outputs(BackboneSpec(family))
    assert not torch.allclose(image_a, image_c)


def test_spec_id_names_the_weights() -> None:
    assert BackboneSpec("ViT-B-16", pretrained="openai").id == "ViT-B-16@openai"
    assert BackboneSpec("x", checkpoint="/a/b/model.pt").id == "x@file:model.pt"
    assert BackboneSpec("x", image_size=112).id == "x:112px"


def test_image_size_changes_the_input_resolution() -> None:
    backbone = load_backbone(BackboneSpec("dmc-tiny-cnn-bert", image_size=48))
    assert backbone.preprocess_val(Image.new("RGB", (100, 80))).shape == (3, 48, 48)
    with torch.no_grad():
        assert backbone.model.encode_image(torch.zeros(1, 3, 48, 48)).shape == (1, 32)


def test_unknown_model_is_a_clear_error() -> None:
    with pytest.raises(BackboneError, match="unknown model"):
        load_backbone("no-such-model")


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="checkpoint file not found"):
        load_backbone(BackboneSpec("dmc-tiny-vit", checkpoint=str(tmp_path / "none.pt")))


def test_pretrained_tag_goes_through_open_clip_and_fails_cleanly_offline() -> None:
    # The real path (name + tag -> open_clip's download) is taken; offline it must fail
    # with our error, not hang or fall back to random weights.
    with pytest.raises(BackboneError, match="could not load backbone ViT-B-16@openai"):
        load_backbone(BackboneSpec("ViT-B-16", pretrained="openai"))


def test_bad_precision_is_refused() -> None:
    with pytest.raises(BackboneError, match="precision"):
        load_backbone("dmc-tiny-vit", precision="int3")
