"""Save and load a learner's state: a folder with `manifest.json` (format version, backbone,
config, classes, and every file's sha256, size and part), the inference part
`inference.safetensors` (adapter, prompts and the cached class prototypes) and the training
part `memory/task-NNNNN.safetensors` (the Gaussian memory of the classes each task
introduced, so that a task that leaves old statistics alone leaves their files
byte-identical and a content-addressed store keeps one copy).

Format 1 (one `state.safetensors` with everything) is still read.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from dmc_core.adapters import AdapterError, adapter_state_dict, load_adapter_state_dict
from dmc_core.backbone import Backbone, BackboneSpec, load_backbone
from dmc_core.config import LearnerConfig
from dmc_core.device import usable_device
from dmc_core.errors import DmcError
from dmc_core.files import atomic_write, sha256_file
from dmc_core.learner import Learner
from dmc_core.memory import GaussianMemory
from dmc_core.state_files import (
    INFERENCE,
    INFERENCE_FILE,
    LEGACY_TENSORS,
    MANIFEST,
    MEMORY_DIR,
    PARTS,
    TRAINING,
    Part,
    files_of_part,
    memory_file,
)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
PROTOTYPES = "prototypes"


class StateError(DmcError, ValueError):
    """A state folder that cannot be loaded; the message says why."""


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def inference_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    """Adapter and prompts (the format-1 names), without the prototypes."""
    tensors = {
        f"adapter.{k}": v
        for k, v in adapter_state_dict(learner.backbone.visual, learner.config.adapter).items()
    }
    tensors["prompts.ctx"] = learner.prompts.ctx.detach()
    for i, tokens in enumerate(learner.prompts.task_tokens):
        tensors[f"prompts.task_tokens.{i}"] = tokens.detach()
    return _cpu(tensors)


def state_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    """Every learned tensor: adapter, prompts and Gaussian memory."""
    tensors = inference_tensors(learner)
    tensors.update(_cpu({f"memory.{k}": v for k, v in learner.memory.state_dict().items()}))
    return tensors


def memory_by_task(learner: Learner) -> dict[int, dict[str, torch.Tensor]]:
    """The memory's tensors split by the task that introduced each class (row)."""
    memory = _cpu(learner.memory.state_dict())
    tasks = [c.task for c in learner.classes]
    if not tasks:
        return {}
    for name, value in memory.items():
        if value.ndim == 0 or value.shape[0] != len(tasks):
            raise StateError(
                f"memory tensor {name!r} has shape {tuple(value.shape)}; the state needs one "
                f"row per class ({len(tasks)})"
            )
    split: dict[int, dict[str, torch.Tensor]] = {}
    for task in sorted(set(tasks)):
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], dtype=torch.long)
        split[task] = {k: v.index_select(0, rows).contiguous() for k, v in memory.items()}
    return split


def save_state(learner: Learner, folder: Path) -> dict[str, Any]:
    """Write the learner's state into `folder` (created); returns the manifest."""
    if learner.merged:
        raise StateError("a merged learner cannot be saved: its adapter is folded into the weights")
    if learner.inference_only:
        raise StateError("a learner loaded for inference only has no memory to save")
    folder.mkdir(parents=True, exist_ok=True)
    inference = inference_tensors(learner)
    if learner.class_names:
        inference[PROTOTYPES] = learner.text_prototypes().detach().float().cpu().contiguous()
    blobs = {INFERENCE_FILE: (INFERENCE, save(inference))}
    # Memory-fused inference scores with the memory: then prediction needs it too.
    memory_part = INFERENCE if learner.config.inference.memory_weight else TRAINING
    for task, tensors in memory_by_task(learner).items():
        blobs[memory_file(task)] = (memory_part, save(tensors))
    files: dict[str, dict[str, Any]] = {}
    for name, (part, data) in blobs.items():
        path = folder.joinpath(*name.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, partial(Path.write_bytes, data=data))
        files[name] = {"sha256": sha256_file(path), "size": len(data), "part": part}
    manifest = {
        "format_version": FORMAT_VERSION,
        "backbone": learner.backbone.spec.to_dict(),
        "backbone_id": learner.backbone.spec.id,
        "backbone_digest": learner.backbone.weights_digest,
        "config": learner.config.to_dict(),
        "classes": [{"name": c.name, "task": c.task} for c in learner.classes],
        "n_tasks": learner.n_tasks,
        "files": files,
    }
    atomic_write(
        folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    )
    # A state saved over an older one: the folder holds exactly what the manifest lists.
    stale = [folder / LEGACY_TENSORS, *(folder / MEMORY_DIR).glob("*.safetensors")]
    for path in stale:
        if path.relative_to(folder).as_posix() not in files:
            path.unlink(missing_ok=True)
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
    if version not in READABLE_FORMATS:
        readable = " and ".join(str(v) for v in READABLE_FORMATS)
        raise StateError(f"{path} has state format {version!r}; this dmc reads formats {readable}")
    return manifest


def _read_tensors(folder: Path, name: str, sha256: str) -> dict[str, torch.Tensor]:
    path = folder.joinpath(*name.split("/"))
    if not path.is_file():
        raise StateError(f"{folder} is not a complete learner state: {name} is missing")
    if sha256_file(path) != sha256:
        raise StateError(f"{path} is corrupt: its sha256 does not match the manifest")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise StateError(f"{path} cannot be read: {error}") from error


def load_state(
    folder: Path,
    backbone: Backbone | None = None,
    *,
    part: Part = "full",
    device: str | None = None,
    precision: str | None = None,
    cache_dir: Path | None = None,
) -> Learner:
    """Rebuild a learner from a saved state.

    `part="inference"` reads only the manifest and the inference file: the learner
    predicts with the saved class prototypes (the text tower never runs) and refuses to
    learn. `part="full"` also reads the Gaussian memory. Without `backbone`, the one
    named in the manifest is loaded; a given backbone must be the one the state was saved
    on. `device` and `precision` override the saved config's; without `device`, a state
    saved on a GPU loads on the CPU of a machine that has none.
    """
    if part not in PARTS:
        raise ValueError(f"unknown state part {part!r}; one of {', '.join(PARTS)}")
    manifest = read_manifest(folder)
    if manifest["format_version"] == 1:
        tensors = _read_tensors(folder, LEGACY_TENSORS, manifest["tensors_sha256"])
        memory = _take(tensors, "memory.") if part == "full" else {}
    else:
        listed = manifest["files"]
        memory_files = _memory_files(manifest)
        tensors = {}
        for name in files_of_part(manifest, "inference")[1:]:
            if name not in memory_files:
                tensors.update(_read_tensors(folder, name, listed[name]["sha256"]))
        memory = {}
        if memory_files and (part == "full" or listed[memory_files[0]]["part"] == INFERENCE):
            memory = _join_memory(
                manifest,
                [_read_tensors(folder, n, listed[n]["sha256"]) for n in memory_files],
            )

    config = LearnerConfig.from_dict(manifest["config"])
    config.device = device if device is not None else usable_device(config.device)
    if precision is not None:
        config.precision = precision  # type: ignore[assignment]
    spec = BackboneSpec.from_dict(manifest["backbone"])
    if backbone is None:
        backbone = load_backbone(spec, device=config.device, cache_dir=cache_dir)
    elif backbone.spec.id != manifest["backbone_id"]:
        raise StateError(
            f"state was saved on backbone {manifest['backbone_id']!r}, not {backbone.spec.id!r}"
        )
    learner = Learner(backbone, config)
    _restore(learner, manifest, tensors)
    check_backbone_weights(manifest, backbone)
    if memory:
        _restore_memory(learner, memory)
    learner.inference_only = part == "inference"
    prototypes = tensors.get(PROTOTYPES)
    if prototypes is not None:
        try:
            learner.use_prototypes(prototypes)
        except ValueError as error:
            raise StateError(f"the cached prototypes do not fit the classes: {error}") from error
    return learner


def check_backbone_weights(manifest: dict[str, Any], backbone: Backbone) -> None:
    """Refuse a backbone whose weights are not provably those the state was saved on: its
    digest differs from the manifest's, or the manifest has none and the backbone names no
    weights (no pretrained tag, no checkpoint: initialised at random in each process)."""
    saved = manifest.get("backbone_digest")
    random_weights = backbone.spec.random_weights
    if saved and backbone.weights_digest and saved != backbone.weights_digest:
        raise StateError(
            f"the state was saved on backbone {manifest['backbone_id']!r} with weights "
            f"sha256 {saved[:12]}..., but the backbone loaded here has "
            f"{backbone.weights_digest[:12]}...: the same name with different weights"
            + (
                " (it has no pretrained tag and no checkpoint, so each process initialises "
                "it at random)"
                if random_weights
                else ""
            )
            + ". Refusing it: give every process the same backbone weights (a checkpoint "
            "file, DMC_BACKBONE_CHECKPOINT, or a pretrained tag)"
        )
    if not saved and random_weights:
        raise StateError(
            f"the state was saved on backbone {manifest['backbone_id']!r}, which has no "
            "pretrained tag and no checkpoint, and its manifest has no weights digest: "
            "the weights cannot be proven identical. Refusing it: save the backbone's "
            "weights to a checkpoint (DMC_BACKBONE_CHECKPOINT) and learn again"
        )


def _memory_files(manifest: dict[str, Any]) -> list[str]:
    return sorted(n for n in manifest["files"] if n.startswith(f"{MEMORY_DIR}/"))


def _join_memory(
    manifest: dict[str, Any], chunks: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Per-task memory files back into one state dict in class order."""
    tasks = [c["task"] for c in manifest["classes"]]
    if not tasks:
        return {}
    # Files are named by task, so sorted names are in task order.
    order = [i for task in sorted(set(tasks)) for i, t in enumerate(tasks) if t == task]
    if len(chunks) != len(set(tasks)) or any(set(c) != set(chunks[0]) for c in chunks):
        raise StateError("the memory files of the state do not match its tasks")
    keys = set(chunks[0])
    rows = torch.empty(len(order), dtype=torch.long)
    rows[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    joined = {}
    for key in sorted(keys):
        stacked = torch.cat([chunk[key] for chunk in chunks])
        if stacked.shape[0] != len(order):
            raise StateError(f"memory tensor {key!r} does not hold one row per class")
        joined[key] = stacked.index_select(0, rows)
    return joined


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _restore(learner: Learner, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    classes = manifest["classes"]
    learner.prompts.restore_classes(
        [c["name"] for c in classes], [c["task"] for c in classes], manifest.get("n_tasks")
    )
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


def _restore_memory(learner: Learner, memory: dict[str, torch.Tensor]) -> None:
    try:
        learner.memory = GaussianMemory.from_state_dict(memory, learner.config.memory)
    except (KeyError, ValueError) as error:
        raise StateError(f"the Gaussian memory in the state is unusable: {error}") from error
    if learner.memory.class_indices != list(range(len(learner.class_names))):
        raise StateError("the Gaussian memory does not hold exactly the state's classes")
