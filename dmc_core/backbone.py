"""Load open_clip models: built-in names with a pretrained tag, local checkpoints, the
project's own small configs (`dmc_core/model_configs/*.json`) and models built on first use
(the offline stand-in)."""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from dmc_core.errors import DmcError
from dmc_core.files import atomic_write, sha256_file
from dmc_core.model_builders import model_builder, model_builder_names

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_CONFIG_DIR = MODEL_CONFIG_DIR / "hf"
DEFAULT_CACHE_DIR = Path(os.path.expanduser("~/.cache/dmc"))

open_clip.add_model_config(MODEL_CONFIG_DIR)

PRECISIONS = ("fp32", "bf16", "fp16")


class BackboneError(DmcError, RuntimeError):
    """A backbone that cannot be loaded, with what to do about it."""


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone: an open_clip name plus a pretrained tag or a checkpoint file.

    `name` may also be `local-dir:/path` (open_clip's folder format) or a locally built model.
    """

    name: str
    pretrained: str | None = None
    checkpoint: str | None = None
    # Input resolution other than the model config's (open_clip's force_image_size); a
    # smaller one makes CNN backbones much cheaper on CPU.
    image_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneSpec:
        return cls(**data)

    @property
    def random_weights(self) -> bool:
        """No pretrained tag, checkpoint or built model: initialised at random per load."""
        return not (
            self.pretrained
            or self.checkpoint
            or self.name.startswith("local-dir:")
            or model_builder(self.name) is not None
        )

    @property
    def id(self) -> str:
        """A stable identifier, used to refuse states saved on another backbone."""
        weights = self.pretrained or ""
        if self.checkpoint:
            weights = f"file:{Path(self.checkpoint).name}"
        identifier = f"{self.name}@{weights}" if weights else self.name
        return f"{identifier}:{self.image_size}px" if self.image_size else identifier


@dataclass
class Backbone:
    """An open_clip model with its transforms and tokenizer."""

    spec: BackboneSpec
    # open_clip `CLIP` or `CustomTextCLIP`: their attributes differ, hence Any.
    model: Any
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    precision: str
    # sha256 of the weights as loaded (`weights_digest`), before any adapter: what proves
    # that two processes run the same backbone (the spec's id names it, not its weights).
    weights_digest: str = ""

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


def _resolve_hf_path(value: str) -> str:
    """Our configs name their Hugging Face folders relative to `model_configs/hf`."""
    local = HF_CONFIG_DIR / value
    return str(local) if local.is_dir() else value


def _text_cfg_overrides(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        return {}
    text_cfg = copy.deepcopy(cfg.get("text_cfg", {}))
    if "hf_model_name" not in text_cfg:
        return {}
    resolved = _resolve_hf_path(text_cfg["hf_model_name"])
    if resolved == text_cfg["hf_model_name"]:
        return {}
    text_cfg["hf_model_name"] = resolved
    text_cfg["hf_tokenizer_name"] = _resolve_hf_path(text_cfg.get("hf_tokenizer_name", resolved))
    return {"text_cfg": text_cfg}


def _tokenizer_for(name: str) -> Callable[..., torch.Tensor]:
    overrides = _text_cfg_overrides(name)
    if overrides:
        text_cfg = overrides["text_cfg"]
        return open_clip.tokenizer.HFTokenizer(
            text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77)
        )
    return open_clip.get_tokenizer(name)


def _open_clip_name(spec: BackboneSpec, cache_dir: Path) -> str:
    builder = model_builder(spec.name)
    return f"local-dir:{builder(cache_dir)}" if builder else spec.name


def load_backbone(
    spec: BackboneSpec | str,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: Path | None = None,
) -> Backbone:
    """Create the open_clip model named by `spec` on `device` in `precision`, in eval mode.

    A `checkpoint` takes precedence over a `pretrained` tag: it is a file written by
    `save_checkpoint` (or any open_clip state dict) for the same architecture.
    """
    if isinstance(spec, str):
        spec = BackboneSpec(spec)
    if precision not in PRECISIONS:
        raise BackboneError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = _open_clip_name(spec, cache_dir or DEFAULT_CACHE_DIR)
    weights = spec.checkpoint or spec.pretrained
    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise BackboneError(f"checkpoint file not found: {spec.checkpoint}")
    if not name.startswith("local-dir:") and open_clip.get_model_config(name) is None:
        raise BackboneError(
            f"unknown model {spec.name!r}: not an open_clip model config "
            f"(see open_clip.list_models()) nor a locally built model {model_builder_names()}"
        )
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name,
            pretrained=None if name.startswith("local-dir:") else weights,
            device=device,
            precision=precision,
            force_image_size=spec.image_size,
            **_text_cfg_overrides(name),
        )
    except RuntimeError as error:
        raise BackboneError(f"could not load backbone {spec.id}: {error}") from error
    model.eval()
    return Backbone(
        weights_digest=weights_digest(model),
        spec=spec,
        model=model,
        preprocess_train=preprocess_train,
        preprocess_val=preprocess_val,
        tokenizer=_tokenizer_for(name),
        device=torch.device(device),
        precision=precision,
    )


def weights_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict: every tensor's name, dtype, shape and bytes, by
    name. Equal digests: the same weights (a random initialisation differs per process)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(model: nn.Module, path: Path) -> str:
    """Save the model's weights where `BackboneSpec(checkpoint=path)` loads them; returns sha256.
    The tensors are saved from the CPU, so that the file loads on any machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save({"state_dict": weights}, tmp))
    return sha256_file(path)
