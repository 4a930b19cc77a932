"""Stage 1's trainable part of the image tower: LoRA or full fine-tuning.

LoRA is a `torch.nn.utils.parametrize` parametrization of the adapted weights, so it is
exact to merge (the parametrized value is written back) and never alters the base weights
while training. (peft's LoRA for `nn.MultiheadAttention` merges and unmerges the base
weight on every forward pass, which lets rounding errors accumulate in it.)

Which layers get LoRA depends on the tower's type, looked up in a registry:
- open_clip `VisionTransformer`: the q, k, v and output projections of every block's
  attention (one low-rank update per projection of the packed q/k/v weight).
- open_clip `TimmModel` (a timm CNN trunk + projection head): the linear and 1x1-convolution
  layers of the last blocks of the trunk, the layers after them (e.g. `conv_head`) and the
  projection head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.nn.utils import parametrize

from dmc_core.config import AdapterConfig
from dmc_core.errors import DmcError

TargetResolver = Callable[[nn.Module, AdapterConfig], list[str]]
_TARGET_RESOLVERS: dict[type[nn.Module], TargetResolver] = {}


class AdapterError(DmcError, ValueError):
    pass


def register_target_resolver(tower: type[nn.Module]) -> Callable[[TargetResolver], TargetResolver]:
    def decorate(resolver: TargetResolver) -> TargetResolver:
        _TARGET_RESOLVERS[tower] = resolver
        return resolver

    return decorate


@register_target_resolver(VisionTransformer)
def _vit_targets(visual: nn.Module, config: AdapterConfig) -> list[str]:
    return [name for name, m in visual.named_modules() if isinstance(m, nn.MultiheadAttention)]


def _is_pointwise(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.groups == 1


def _block_key(name: str) -> str | None:
    """The innermost numbered block a layer is in: `blocks.5.0.se.conv_reduce` -> `blocks.5.0`."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbered[-1] + 1]) if numbered else None


@register_target_resolver(TimmModel)
def _timm_cnn_targets(visual: nn.Module, config: AdapterConfig) -> list[str]:
    candidates = [
        name for name, m in visual.named_modules() if name.startswith("trunk.") and _is_pointwise(m)
    ]
    block_keys: list[str] = []
    for name in candidates:
        key = _block_key(name)
        if key is not None and key not in block_keys:
            block_keys.append(key)
    kept_blocks = set(block_keys[-config.last_blocks :]) if config.last_blocks > 0 else set()
    first_kept = min(
        (i for i, name in enumerate(candidates) if _block_key(name) in kept_blocks),
        default=len(candidates),
    )
    trunk_targets = [
        name
        for i, name in enumerate(candidates)
        if _block_key(name) in kept_blocks or (i > first_kept and _block_key(name) is None)
    ]
    head_targets = [
        name for name, m in visual.named_modules() if name.startswith("head.") and _is_pointwise(m)
    ]
    return trunk_targets + head_targets


def lora_targets(visual: nn.Module, config: AdapterConfig) -> list[str]:
    if config.target_modules is not None:
        return list(config.target_modules)
    for tower_type, resolver in _TARGET_RESOLVERS.items():
        if isinstance(visual, tower_type):
            return resolver(visual, config)
    raise AdapterError(
        f"no LoRA target rule for image tower {type(visual).__name__}; set "
        f"adapter.target_modules or use adapter.mode='full' "
        f"(known towers: {[t.__name__ for t in _TARGET_RESOLVERS]})"
    )


class LoRADelta(nn.Module):
    """Parametrization W -> W + (alpha / r) * B @ A for a weight [out, in, 1, ...].

    With `n_blocks` > 1 the output rows are split into equal blocks, each with its own
    (A, B): a packed q/k/v projection gets one low-rank update per projection.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, n_blocks: int = 1) -> None:
        super().__init__()
        out_features, in_features = weight.shape[0], weight[0].numel()
        if out_features % n_blocks:
            raise AdapterError(f"{out_features} output rows do not split into {n_blocks} blocks")
        self.scale = alpha / rank
        a = torch.empty(n_blocks, rank, in_features, device=weight.device)
        for block in a:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(
            torch.zeros(n_blocks, out_features // n_blocks, rank, device=weight.device)
        )

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = torch.bmm(self.lora_B, self.lora_A).reshape(weight.shape)
        return weight + (self.scale * delta).to(weight.dtype)


def _parametrize(module: nn.Module, name: str, config: AdapterConfig, n_blocks: int) -> None:
    delta = LoRADelta(getattr(module, name), config.rank, config.alpha, n_blocks)
    parametrize.register_parametrization(module, name, delta)


def attach_adapter(visual: nn.Module, config: AdapterConfig) -> list[str]:
    """Make the tower trainable in the configured way; returns the adapted module names.

    Everything else in the tower is frozen. LoRA starts as the identity (B = 0).
    """
    if any(isinstance(m, LoRADelta) for m in visual.modules()):
        raise AdapterError("this image tower already has an adapter: load a fresh backbone")
    visual.requires_grad_(False)
    if config.mode == "full":
        visual.requires_grad_(True)
        return [name for name, _ in visual.named_children()]
    if config.mode != "lora":
        raise AdapterError(f"adapter.mode must be 'lora' or 'full', got {config.mode!r}")
    targets = lora_targets(visual, config)
    if not targets:
        raise AdapterError(f"no layer of {type(visual).__name__} matched the LoRA targets")
    modules = dict(visual.named_modules())
    for name in targets:
        module = modules.get(name)
        if isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is None:
                raise AdapterError(f"{name}: attention without a packed q/k/v projection")
            _parametrize(module, "in_proj_weight", config, n_blocks=3)
            _parametrize(module.out_proj, "weight", config, n_blocks=1)
        elif module is not None and _is_pointwise(module):
            _parametrize(module, "weight", config, n_blocks=1)
        else:
            raise AdapterError(
                f"LoRA target {name!r} is not an attention, linear or 1x1-conv layer of the tower"
            )
    return targets


def trainable_parameters(visual: nn.Module) -> list[nn.Parameter]:
    return [p for p in visual.parameters() if p.requires_grad]


def adapter_state_dict(visual: nn.Module, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The tensors that stage 1 changes: the LoRA weights, or the whole tower."""
    state = visual.state_dict()
    if config.mode == "full":
        return {k: v.detach().clone() for k, v in state.items()}
    return {k: v.detach().clone() for k, v in state.items() if "lora_" in k}


def load_adapter_state_dict(
    visual: nn.Module, tensors: dict[str, torch.Tensor], config: AdapterConfig
) -> None:
    expected = adapter_state_dict(visual, config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterError(
            f"adapter tensors do not match this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise AdapterError(
                f"adapter tensor {key} has shape {tuple(value.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    visual.load_state_dict(tensors, strict=False)


def merge_adapter(visual: nn.Module) -> int:
    """Fold LoRA into the base weights for inference; returns how many weights were merged.

    The tower cannot be trained further afterwards.
    """
    parametrized = [
        (module, name)
        for module in visual.modules()
        if parametrize.is_parametrized(module)
        for name in list(cast(nn.ModuleDict, module.parametrizations))
    ]
    for module, name in parametrized:
        parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return len(parametrized)
