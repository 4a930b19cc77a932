"""The methods an experiment compares, by name (`@register_method`).

- `zeroshot`: Continual-CLIP. The pretrained model with the hand-written prompt
  (`learner.prompts.template`, "a photo of a {}.") over the growing label set; nothing is
  trained.
- `finetune`: sequential fine-tuning, the lower bound. DMC's two stages on each task's data
  only: no Gaussian replay in stage 2 (`stage2.samples_per_old_class = 0`), no calibration,
  no task tokens.
- `dmc`: DMC (the learner's method "dmc").
- `dmc_ot`: DMC-OT (method "dmc_ot": OT calibration of the memory + task tokens).
- `simplecil`: SimpleCIL (Zhou et al. 2023, as in PILOT): the class means of the frozen
  backbone's image features of each class's train images, cosine classifier. Nothing is
  trained; the strong exemplar-free baseline a trained method must beat.
- `fecam`: FeCAM-style (Goswami et al. 2023): per class, the mean and covariance of the
  L2-normalised frozen features, shrunk with the memory's own `fecam_shrink` (alphas from
  `memory.shrink_alpha1/2`) and normalised to a correlation matrix; Mahalanobis classifier.
- Variants of DMC / DMC-OT that differ only in learner settings (rows by configuration):
  `dmc_capacity_matched` (DMC; give it DMC-OT's final token count with
  `method_overrides: {dmc_capacity_matched: {prompts: {n_ctx: ...}}}`),
  `dmc_calibration_only` (DMC-OT without task tokens), `dmc_tokens_only` (DMC-OT with
  `calibration.method: none`), `dmc_ot_retrained_tokens` (old tasks' tokens retrained on
  replay), `dmc_ot_memory_fused` (DMC-OT predicting with text + memory scores,
  `inference.memory_weight`, 1 unless the experiment sets one).
- `joint`: the upper bound. After each task t, a fresh learner (the pretrained backbone,
  new LoRA and prompts) learns the train images of all tasks 0..t as one task, with
  DMC-OT's model and settings (LoRA, shared context and one set of task tokens, as the
  data is one task): stage 1 cross-entropy over all classes seen so far, stage 2 on their
  real features. With one task there is nothing to replay or calibrate. It costs
  1 + 2 + ... + T tasks' worth of training. `method_overrides: {joint: {method: dmc}}`
  makes it DMC's model instead.

Every method is evaluated the same way: the image features of the test images under its
current encoder, scored over all classes seen so far (against the text prototypes, unless
the method says otherwise above).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from dmc_core.adapters import adapter_state_dict
from dmc_core.backbone import Backbone
from dmc_core.class_scores import cosine_scores, fecam_precisions, mahalanobis_scores
from dmc_core.config import LearnerConfig
from dmc_core.data.images import ConcatImages, Images
from dmc_core.experiment.features import tensor_hash
from dmc_core.learner import Learner, ProgressCallback, TaskReport
from dmc_core.pixels import image_batches, loader_workers, to_device
from dmc_core.state import load_state, save_state

__all__ = [
    "Method",
    "TaskData",
    "get_method_class",
    "list_methods",
    "register_method",
]

PRETRAINED = "pretrained"


@dataclass
class TaskData:
    """One task's train data: labels index `class_names` (0 .. len - 1)."""

    index: int
    class_ids: list[int]
    class_names: list[str]
    images: Images
    labels: np.ndarray


class Method(ABC):
    """Learns tasks one by one and classifies features over all classes seen so far."""

    name: ClassVar[str] = ""
    # Keeps a learner (and its Gaussian memory) from task to task.
    has_memory: ClassVar[bool] = False

    def __init__(self, backbone_factory: Callable[[], Backbone], config: LearnerConfig) -> None:
        self.backbone_factory = backbone_factory
        self.config = config

    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        """The method's settings derived from the experiment's learner settings."""
        return base

    @abstractmethod
    def learn(
        self, task: TaskData, seen: Sequence[TaskData], progress: ProgressCallback
    ) -> TaskReport | None:
        """Learn `task` (the last of `seen`, the tasks so far)."""

    @abstractmethod
    def encoder_id(self) -> str:
        """Identifies the current image encoder: equal ids give equal features."""

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Un-normalised image features (float32, CPU) of a preprocessed batch."""

    @abstractmethod
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores [n, classes seen so far] of image features, in the order classes arrived."""

    @property
    @abstractmethod
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The test transform (PIL image -> tensor)."""

    @property
    def learner(self) -> Learner | None:
        return None

    def pixel_batches(self, images: Sequence[Any], batch_size: int) -> Iterable[torch.Tensor]:
        """`images` through the test transform in batches, made by DataLoader workers
        (`loader_workers`), in pinned memory for a GPU."""
        device = torch.device(self.config.device)
        workers = loader_workers(self.config.loader_workers, device)
        batches = image_batches(images, self.preprocess, batch_size, workers=workers, device=device)
        return (pixels for pixels, _ in batches)

    def save(self, folder: Path) -> bool:
        """Write what the next task needs into `folder`; False if nothing is needed."""
        return False

    @abstractmethod
    def restore(self, folder: Path | None, seen: Sequence[TaskData]) -> None:
        """Continue after the tasks `seen` (from `folder` if `save` wrote one)."""


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def decorate(cls: type[Method]) -> type[Method]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorate


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(_METHODS)}")
    return _METHODS[name]


def _autocast(
    config: LearnerConfig, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    enabled = config.precision == "bf16" and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@register_method("zeroshot")
class ZeroShot(Method):
    """Continual-CLIP: pretrained encoders, hand-written prompt, growing label set."""

    def __init__(self, backbone_factory: Callable[[], Backbone], config: LearnerConfig) -> None:
        super().__init__(backbone_factory, config)
        self.backbone = backbone_factory()
        self.device = torch.device(config.device)
        self.backbone.model.to(self.device).eval()
        self.class_names: list[str] = []
        self._text: torch.Tensor | None = None

    def learn(
        self, task: TaskData, seen: Sequence[TaskData], progress: ProgressCallback
    ) -> TaskReport | None:
        self.class_names += task.class_names
        self._text = None
        progress("prompts", 1, 1)
        return None

    def restore(self, folder: Path | None, seen: Sequence[TaskData]) -> None:
        self.class_names = [name for task in seen for name in task.class_names]
        self._text = None

    def encoder_id(self) -> str:
        return PRETRAINED

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self.backbone.preprocess_val

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _autocast(self.config, self.device):
            return self.backbone.model.encode_image(to_device(pixels, self.device)).float().cpu()

    def text_features(self) -> torch.Tensor:
        if self._text is None:
            prompts = [self.config.prompts.template.format(n) for n in self.class_names]
            with torch.inference_mode(), _autocast(self.config, self.device):
                tokens = self.backbone.tokenizer(prompts).to(self.device)
                text = self.backbone.model.encode_text(tokens).float()
            self._text = F.normalize(text, dim=-1).cpu()
        return self._text

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        scale = self.config.logit_scale or self.backbone.logit_scale
        return scale * F.normalize(features.float(), dim=-1) @ self.text_features().T


class LearnerMethod(Method):
    """A `Learner` carried from task to task."""

    has_memory = True

    def __init__(self, backbone_factory: Callable[[], Backbone], config: LearnerConfig) -> None:
        super().__init__(backbone_factory, config)
        self._learner: Learner | None = None

    @property
    def learner(self) -> Learner:
        if self._learner is None:
            self._learner = Learner(self.backbone_factory(), self.config)
        return self._learner

    def learn(
        self, task: TaskData, seen: Sequence[TaskData], progress: ProgressCallback
    ) -> TaskReport | None:
        return self.learner.learn_task(
            task.images, task.labels.tolist(), task.class_names, progress=progress
        )

    def encoder_id(self) -> str:
        learner = self.learner
        return tensor_hash(adapter_state_dict(learner.backbone.visual, learner.config.adapter))

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self.learner.backbone.preprocess_val

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        # `cached` computes each LoRA-adapted weight once per batch, as Learner.logits does.
        with torch.inference_mode(), parametrize.cached():
            return self.learner.encode_images(pixels).cpu()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.learner.feature_logits(features).cpu()

    def save(self, folder: Path) -> bool:
        save_state(self.learner, folder)
        return True

    def restore(self, folder: Path | None, seen: Sequence[TaskData]) -> None:
        if folder is None:
            raise ValueError(f"{self.name}: no saved state to continue from")
        self._learner = load_state(folder, self.backbone_factory(), device=self.config.device)


@register_method("finetune")
class Finetune(LearnerMethod):
    """Both stages on each task's data only: no replay, no calibration (the lower bound)."""

    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        return base.with_overrides({"method": "dmc", "stage2.samples_per_old_class": 0})


@register_method("dmc")
class DMC(LearnerMethod):
    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        return base.with_overrides({"method": "dmc"})


@register_method("dmc_ot")
class DMCOT(LearnerMethod):
    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        return base.with_overrides({"method": "dmc_ot"})


def _preset(name: str, overrides: dict[str, Any], doc: str) -> None:
    """Register a learner method that is DMC / DMC-OT with fixed settings."""

    def learner_config(cls: type[Method], base: LearnerConfig) -> LearnerConfig:
        return base.with_overrides(overrides)

    namespace = {"__doc__": doc, "learner_config": classmethod(learner_config)}
    register_method(name)(type(name, (LearnerMethod,), namespace))


_preset(
    "dmc_capacity_matched",
    {"method": "dmc"},
    "DMC; the experiment sets `prompts.n_ctx` to DMC-OT's final token count.",
)
_preset(
    "dmc_calibration_only",
    {"method": "dmc_ot", "prompts.task_tokens": 0},
    "DMC + OT calibration of the memory, no task tokens.",
)
_preset(
    "dmc_tokens_only",
    {"method": "dmc_ot", "calibration.method": "none", "prompts.train_old_task_tokens": False},
    "DMC + task tokens (older tasks' frozen), no calibration.",
)
_preset(
    "dmc_ot_retrained_tokens",
    {"method": "dmc_ot", "prompts.train_old_task_tokens": True},
    "DMC-OT whose older tasks' tokens keep training on replay in stage 2.",
)


@register_method("dmc_ot_memory_fused")
class DMCOTMemoryFused(LearnerMethod):
    """DMC-OT predicting with text logits + w * memory scores (w = 1 unless set)."""

    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        config = base.with_overrides({"method": "dmc_ot"})
        if config.inference.memory_weight == 0:
            config = config.with_overrides({"inference.memory_weight": 1.0})
        return config


class ClassStatistics(ZeroShot):
    """Classifies frozen features by per-class statistics of the train images."""

    def __init__(self, backbone_factory: Callable[[], Backbone], config: LearnerConfig) -> None:
        super().__init__(backbone_factory, config)
        self.means: list[torch.Tensor] = []

    def learn(
        self, task: TaskData, seen: Sequence[TaskData], progress: ProgressCallback
    ) -> TaskReport | None:
        self.class_names += task.class_names
        chunks = []
        done = 0
        for pixels in self.pixel_batches(task.images, self.config.feature_batch_size):
            chunks.append(self.encode(pixels))
            done += len(pixels)
            progress("encode", done, len(task.images))
        features = torch.cat(chunks)
        labels = torch.as_tensor(task.labels)
        for i in range(len(task.class_names)):
            self.add_class(features[labels == i])
        return None

    def restore(self, folder: Path | None, seen: Sequence[TaskData]) -> None:
        self.__init__(self.backbone_factory, self.config)  # type: ignore[misc]
        for t, task in enumerate(seen):
            self.learn(task, seen[: t + 1], lambda stage, step, total: None)

    def add_class(self, features: torch.Tensor) -> None:
        self.means.append(features.double().mean(dim=0))


@register_method("simplecil")
class SimpleCIL(ClassStatistics):
    """Cosine to the class means of frozen features."""

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        scale = self.config.logit_scale or self.backbone.logit_scale
        return cosine_scores(features, torch.stack(self.means), scale)


@register_method("fecam")
class FeCAM(ClassStatistics):
    """Mahalanobis distance with shrunk, correlation-normalised covariances of the
    L2-normalised frozen features."""

    def __init__(self, backbone_factory: Callable[[], Backbone], config: LearnerConfig) -> None:
        super().__init__(backbone_factory, config)
        self.precisions: list[torch.Tensor] = []
        # Means and matrices stacked once per class count, not at every call.
        self._stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    def add_class(self, features: torch.Tensor) -> None:
        x = F.normalize(features.double(), dim=-1)
        self.means.append(x.mean(dim=0))
        memory = self.config.memory
        cov = torch.cov(x.T)[None]
        self.precisions.append(fecam_precisions(cov, memory.shrink_alpha1, memory.shrink_alpha2)[0])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self._stacked is None or len(self._stacked[0]) != len(self.means):
            self._stacked = torch.stack(self.means), torch.stack(self.precisions)
        x = F.normalize(features.double(), dim=-1)
        return mahalanobis_scores(x, *self._stacked)


@register_method("joint")
class Joint(LearnerMethod):
    """A fresh learner trained on all tasks so far as one task (the upper bound)."""

    has_memory = False

    @classmethod
    def learner_config(cls, base: LearnerConfig) -> LearnerConfig:
        return base.with_overrides({"method": "dmc_ot"})

    def learn(
        self, task: TaskData, seen: Sequence[TaskData], progress: ProgressCallback
    ) -> TaskReport | None:
        self._learner = Learner(self.backbone_factory(), self.config)
        images = ConcatImages([t.images for t in seen])
        labels: list[int] = []
        names: list[str] = []
        for t in seen:
            labels += (t.labels + len(names)).tolist()
            names += t.class_names
        return self._learner.learn_task(images, labels, names, progress=progress)

    def save(self, folder: Path) -> bool:
        return False  # every task starts again from the pretrained backbone

    def restore(self, folder: Path | None, seen: Sequence[TaskData]) -> None:
        self._learner = None
