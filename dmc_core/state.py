"""Save and load a learner's whole state: a folder with `state.safetensors` (adapter,
prompts, Gaussian memory) and `manifest.json` (format version, backbone, config, classes,
the tensor file's sha256)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmc_core.adapters import AdapterError, adapter_state_dict, load_adapter_state_dict
from dmc_core.backbone import Backbone, BackboneSpec, load_backbone
from dmc_core.config import LearnerConfig
from dmc_core.errors import DmcError
from dmc_core.files import atomic_write, sha256_file
from dmc_core.learner import Learner
from dmc_core.memory import GaussianMemory

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "state.safetensors"
STATE_FILES = (MANIFEST, TENSORS)


class StateError(DmcError, ValueError):
    """A state folder that cannot be loaded; the message says why."""


def state_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    tensors = {
        f"adapter.{k}": v
        for k, v in adapter_state_dict(learner.backbone.visual, learner.config.adapter).items()
    }
    tensors["prompts.ctx"] = learner.prompts.ctx.detach()
    for i, tokens in enumerate(learner.prompts.task_tokens):
        tensors[f"prompts.task_tokens.{i}"] = tokens.detach()
    tensors.update({f"memory.{k}": v for k, v in learner.memory.state_dict().items()})
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_state(learner: Learner, folder: Path) -> dict[str, Any]:
    """Write the learner's state into `folder` (created); returns the manifest."""
    if learner.merged:
        raise StateError("a merged learner cannot be saved: its adapter is folded into the weights")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS, lambda tmp: save_file(state_tensors(learner), str(tmp)))
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": learner.backbone.spec.to_dict(),
        "backbone_id": learner.backbone.spec.id,
        "config": learner.config.to_dict(),
        "classes": [{"name": c.name, "task": c.task} for c in learner.classes],
        "n_tasks": learner.n_tasks,
        "tensors_sha256": sha256_file(folder / TENSORS),
    }
    atomic_write(
        folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    )
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise StateError(f"{folder} is not a learner state: {MANIFEST} is missing")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise StateError(f"{path} is not valid JSON: {error}") from error
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise StateError(
            f"{path} has state format {version!r}; this dmc reads format {FORMAT_VERSION}"
        )
    return manifest


def load_state(
    folder: Path,
    backbone: Backbone | None = None,
    *,
    device: str | None = None,
    cache_dir: Path | None = None,
) -> Learner:
    """Rebuild a learner from a saved state.

    Without `backbone`, the one named in the manifest is loaded. A given backbone must be
    the same one the state was saved on. `device` overrides the saved config's device.
    """
    manifest = read_manifest(folder)
    tensor_path = folder / TENSORS
    if not tensor_path.is_file():
        raise StateError(f"{folder} is not a learner state: {TENSORS} is missing")
    if sha256_file(tensor_path) != manifest["tensors_sha256"]:
        raise StateError(f"{tensor_path} is corrupt: its sha256 does not match the manifest")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as error:
        raise StateError(f"{tensor_path} cannot be read: {error}") from error

    config = LearnerConfig.from_dict(manifest["config"])
    if device is not None:
        config.device = device
    spec = BackboneSpec.from_dict(manifest["backbone"])
    if backbone is None:
        backbone = load_backbone(spec, device=config.device, cache_dir=cache_dir)
    elif backbone.spec.id != manifest["backbone_id"]:
        raise StateError(
            f"state was saved on backbone {manifest['backbone_id']!r}, not {backbone.spec.id!r}"
        )
    learner = Learner(backbone, config)
    _restore(learner, manifest, tensors)
    return learner


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _restore(learner: Learner, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    classes = manifest["classes"]
    learner.prompts.restore_classes([c["name"] for c in classes], [c["task"] for c in classes])
    try:
        load_adapter_state_dict(
            learner.backbone.visual, _take(tensors, "adapter."), learner.config.adapter
        )
    except AdapterError as error:
        raise StateError(f"state does not fit this backbone: {error}") from error
    prompts = _take(tensors, "prompts.")
    n_task_tokens = len(learner.prompts.task_tokens)
    expected = {"ctx", *(f"task_tokens.{i}" for i in range(n_task_tokens))}
    if set(prompts) != expected:
        raise StateError(f"prompt tensors {sorted(prompts)} do not match {sorted(expected)}")
    with torch.no_grad():
        for name, value in prompts.items():
            target = learner.prompts.get_parameter(name)
            if target.shape != value.shape:
                raise StateError(
                    f"prompt tensor {name} has shape {tuple(value.shape)}, "
                    f"this backbone needs {tuple(target.shape)}"
                )
            target.copy_(value)
    try:
        learner.memory = GaussianMemory.from_state_dict(
            _take(tensors, "memory."), learner.config.memory
        )
    except (KeyError, ValueError) as error:
        raise StateError(f"the Gaussian memory in the state is unusable: {error}") from error
    if learner.memory.class_indices != list(range(len(classes))):
        raise StateError("the Gaussian memory does not hold exactly the state's classes")
