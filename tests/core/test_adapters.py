from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.utils import parametrize

from dmc_core.adapters import (
    AdapterError,
    LoRADelta,
    adapter_state_dict,
    attach_adapter,
    merge_adapter,
    trainable_parameters,
)
from dmc_core.backbone import Backbone
from dmc_core.config import AdapterConfig
from tests.core.toy import FAMILIES


def _pixels(backbone: Backbone) -> torch.Tensor:
    size = backbone.model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))


def _perturb_lora(visual: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in visual.modules():
            if isinstance(module, LoRADelta):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.05)


def test_vit_lora_targets_every_attention_projection(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    visual = backbone_factory("dmc-tiny-vit").visual
    targets = attach_adapter(visual, AdapterConfig(rank=4))
    n_blocks = len(visual.transformer.resblocks)
    assert targets == [f"transformer.resblocks.{i}.attn" for i in range(n_blocks)]
    for block in visual.transformer.resblocks:
        packed = block.attn.parametrizations.in_proj_weight[0]
        assert packed.lora_A.shape[0] == 3  # q, k and v each get their own update
        assert parametrize.is_parametrized(block.attn.out_proj, "weight")
    trainable = {n for n, p in visual.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_cnn_lora_targets_last_blocks_pointwise_layers_and_head(
    backbone_factory: Callable[[str], Backbone],
) -> None:
    visual = backbone_factory("dmc-tiny-cnn-bert").visual
    targets = attach_adapter(visual, AdapterConfig(rank=4, last_blocks=1))
    modules = dict(visual.named_modules())
    assert "head.proj" in targets
    assert any(t.startswith("trunk.blocks.4.") for t in targets)
    assert not any(t.startswith(("trunk.blocks.0.", "trunk.blocks.3.")) for t in targets)
    assert "trunk.conv_head" in targets  # the layer after the last block
    for name in targets:
        module = modules[name]
        if isinstance(module, torch.nn.Conv2d):
            assert module.kernel_size == (1, 1) and module.groups == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_starts_as_identity_and_merges_exactly(
    family: str, backbone_factory: Callable[[str], Backbone]
) -> None:
    backbone = backbone_factory(family)
    pixels = _pixels(backbone)
    with torch.no_grad():
        base = backbone.model.encode_image(pixels)
        attach_adapter(backbone.visual, AdapterConfig(rank=4))
        assert torch.allclose(backbone.model.encode_image(pixels), base, atol=1e-6)
        _perturb_lora(backbone.visual)
        adapted = backbone.model.encode_image(pixels)
        assert not torch.allclose(adapted, base, atol=1e-4)
        assert merge_adapter(backbone.visual) > 0
        merged = backbone.model.encode_image(pixels)
    assert not any(parametrize.is_parametrized(m) for m in backbone.visual.modules())
    assert torch.allclose(merged, adapted, atol=1e-6, rtol=1e-5)


def test_training_never_alters_base_weights(backbone_factory: Callable[[str], Backbone]) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    visual = backbone.visual
    base = {k: v.clone() for k, v in visual.state_dict().items()}
    attach_adapter(visual, AdapterConfig(rank=4))
    optimizer = torch.optim.SGD(trainable_parameters(visual), lr=0.1)
    for _ in range(3):
        loss = backbone.model.encode_image(_pixels(backbone)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = visual.state_dict()
    for key, value in base.items():
        parametrized_key = key.replace(
            "attn.in_proj_weight", "attn.parametrizations.in_proj_weight.original"
        )
        parametrized_key = parametrized_key.replace(
            "out_proj.weight", "out_proj.parametrizations.weight.original"
        )
        assert torch.equal(after[parametrized_key], value), key
    assert any(
        v.abs().sum() > 0
        for k, v in adapter_state_dict(visual, AdapterConfig()).items()
        if "lora_B" in k
    )


def test_full_mode_trains_the_whole_tower(backbone_factory: Callable[[str], Backbone]) -> None:
    backbone = backbone_factory("dmc-tiny-vit")
    attach_adapter(backbone.visual, AdapterConfig(mode="full"))
    assert all(p.requires_grad for p in backbone.visual.parameters())
    state = adapter_state_dict(backbone.visual, AdapterConfig(mode="full"))
    assert set(state) == set(backbone.visual.state_dict())


def test_adapter_errors(backbone_factory: Callable[[str], Backbone]) -> None:
    visual = backbone_factory("dmc-tiny-vit").visual
    with pytest.raises(AdapterError, match="not an attention, linear or 1x1-conv"):
        attach_adapter(visual, AdapterConfig(target_modules=["conv1"]))
    visual = backbone_factory("dmc-tiny-vit").visual
    attach_adapter(visual, AdapterConfig())
    with pytest.raises(AdapterError, match="already has an adapter"):
        attach_adapter(visual, AdapterConfig())
