"""The DMC / DMC-OT learner: one task at a time, no stored images (METHOD.md)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from dmc_core.adapters import (
    adapter_state_dict,
    attach_adapter,
    load_adapter_state_dict,
    merge_adapter,
    trainable_parameters,
)
from dmc_core.backbone import Backbone
from dmc_core.calibration import CalibrationReport, Calibrator, get_calibrator
from dmc_core.class_scores import MemoryScorer
from dmc_core.config import LearnerConfig, Stage2Config
from dmc_core.device import deterministic_algorithms, prepare
from dmc_core.errors import DmcError
from dmc_core.memory import GaussianMemory
from dmc_core.pixels import (
    PixelTransform,
    image_batches,
    loader_workers,
    preprocess_all,
    split_transform,
    to_device,
)
from dmc_core.prompts import PromptLearner
from dmc_core.text import text_tower_for

ProgressCallback = Callable[[str, int, int], None]
"""Called as progress(stage, step, total) while a task is learned."""

STAGES = ("encode", "stage1", "memory", "stage2")


class TaskError(DmcError, ValueError):
    """A task that cannot be learned as given; the message says what to fix."""


@dataclass
class ClassInfo:
    name: str
    task: int


@dataclass
class Prediction:
    names: list[str]
    probabilities: list[float]
    indices: list[int]


@dataclass
class TaskReport:
    """What one `learn_task` did, for logs and version metrics."""

    task: int
    class_names: list[str]
    images_per_class: dict[str, int]
    stage1_loss: float | None = None
    stage1_train_accuracy: float | None = None
    stage2_loss: float | None = None
    train_accuracy: float | None = None
    calibration: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )


def _optimise(optimizer: torch.optim.Optimizer, scheduler: Any, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def _report_calibration(report: CalibrationReport) -> dict[str, Any]:
    return {
        "method": report.method,
        "classes": report.class_indices,
        "mean_shift": report.mean_shift.tolist(),
        "covariance_shift": report.covariance_shift.tolist(),
        "marginal_error": report.marginal_error,
    }


class Learner:
    """Class-incremental learner on an open_clip backbone.

    State that persists across tasks: the image-tower adapter, the prompt learner (shared
    context and task tokens) and the Gaussian memory. The text tower never changes.
    """

    def __init__(self, backbone: Backbone, config: LearnerConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config or LearnerConfig()
        self.device = torch.device(self.config.device)
        prepare(self.device, deterministic=self.config.deterministic)
        model = backbone.model.to(self.device)
        model.requires_grad_(False)
        model.eval()
        torch.manual_seed(self.config.seed)
        # Read once: the scale is frozen, and reading it is a host-device sync.
        self._backbone_logit_scale = backbone.logit_scale
        # A backbone loaded in bf16 takes bf16 input (its LoRA weights stay float32).
        self._input_dtype = _input_dtype(backbone.visual)
        self.eval_transform = split_transform(backbone.preprocess_val)
        self.train_transform = _train_transform(backbone.preprocess_train, self.eval_transform)
        self.adapter_targets = attach_adapter(backbone.visual, self.config.adapter)
        self.text_tower = text_tower_for(model, backbone.tokenizer)
        n_task_tokens = self.config.prompts.task_tokens if self.config.uses_task_tokens else 0
        self.prompts = PromptLearner(self.text_tower, self.config.prompts, n_task_tokens)
        self.prompts.to(self.device)
        self.memory = GaussianMemory(self.config.memory)
        self.merged = False
        # Loaded without its Gaussian memory (a serving replica): it predicts, never learns.
        self.inference_only = False
        self._prototypes: torch.Tensor | None = None
        self._memory_scorer: MemoryScorer | None = None

    # ------------------------------------------------------------------ queries
    @property
    def classes(self) -> list[ClassInfo]:
        return [
            ClassInfo(name, task)
            for name, task in zip(self.prompts.class_names, self.prompts.class_tasks, strict=True)
        ]

    @property
    def class_names(self) -> list[str]:
        return list(self.prompts.class_names)

    @property
    def n_tasks(self) -> int:
        return self.prompts.n_tasks

    @property
    def logit_scale(self) -> float:
        return self.config.logit_scale or self._backbone_logit_scale

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        enabled = self.config.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Un-normalised image embeddings, in float32, of a preprocessed batch: uint8 from
        `preprocess` (normalised here, on the device) or the transform's float output."""
        pixels = self.eval_transform.finish(to_device(pixels, self.device))
        with self._autocast():
            return self.backbone.model.encode_image(pixels.to(self._input_dtype)).float()

    def text_prototypes(self) -> torch.Tensor:
        """L2-normalised text features of every seen class, cached until the prompts change."""
        if self._prototypes is None:
            with torch.inference_mode(), self._autocast():
                self._prototypes = F.normalize(self.prompts().float(), dim=-1)
        return self._prototypes

    def use_prototypes(self, prototypes: torch.Tensor) -> None:
        """Answer with these saved prototypes (one L2-normalised row per class) instead of
        running the text tower; dropped as soon as the prompts change."""
        if prototypes.shape[0] != len(self.class_names):
            raise ValueError(
                f"{prototypes.shape[0]} prototypes for {len(self.class_names)} classes"
            )
        self._prototypes = prototypes.float().to(self.device)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        # `cached` computes each LoRA-adapted weight once per call, not once per use. Its
        # switch is process-wide, so a merged learner (no LoRA left; the server's, whose
        # threads predict while a job thread may train) never turns it on.
        cache = contextlib.nullcontext() if self.merged else parametrize.cached()
        with torch.inference_mode(), cache:
            return self.feature_logits(self.encode_images(pixels))

    def feature_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores of un-normalised image features: s * cos to the text prototypes,
        plus `inference.memory_weight` times the memory's scores when that is set."""
        with torch.inference_mode():
            features = features.float().to(self.device)
            x = F.normalize(features, dim=-1)
            logits = self.logit_scale * x @ self.text_prototypes().T
            weight = self.config.inference.memory_weight
            if weight:
                logits = logits + weight * self.memory_scorer()(features)
            return logits

    def memory_scorer(self) -> MemoryScorer:
        """Scores from the Gaussian memory, cached until the memory changes."""
        kind = self.config.inference.memory_score
        shrink = (self.config.memory.shrink_alpha1, self.config.memory.shrink_alpha2)
        scorer = self._memory_scorer
        if (
            scorer is None
            or scorer.memory is not self.memory
            or (scorer.kind, scorer.shrink) != (kind, shrink)
            or len(scorer.means) != len(self.class_names)
        ):
            self._memory_scorer = MemoryScorer(
                self.memory, len(self.class_names), kind, self.logit_scale, self.device, shrink
            )
        return self._memory_scorer  # type: ignore[return-value]

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """The batch of the test transform's pixels, as uint8 when the transform allows
        (`encode_images` normalises them on the device)."""
        return torch.stack([self.eval_transform.to_uint8(image) for image in images])

    @property
    def loader_workers(self) -> int:
        return loader_workers(self.config.loader_workers, self.device)

    def predict(self, images: Sequence[Any] | torch.Tensor, top_k: int = 5) -> list[Prediction]:
        """Top-k class names and probabilities for PIL images or a preprocessed batch."""
        if not self.class_names:
            raise TaskError("no class has been learned yet")
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(images)
        predictions: list[Prediction] = []
        for batch in pixels.split(self.config.feature_batch_size):
            probabilities = self.logits(batch).softmax(dim=-1)
            top = probabilities.topk(min(top_k, probabilities.shape[1]), dim=-1)
            for values, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                names = [self.prompts.class_names[i] for i in indices]
                predictions.append(Prediction(names, values, indices))
        return predictions

    def merge_for_inference(self) -> None:
        """Fold the LoRA adapter into the image tower (faster predict; no more learning)."""
        merge_adapter(self.backbone.visual)
        self.merged = True

    # ----------------------------------------------------------------- learning
    def learn_task(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: Sequence[str],
        progress: ProgressCallback | None = None,
    ) -> TaskReport:
        """Learn new classes: stage 1, memory update (+ OT calibration), stage 2.

        `labels[i]` indexes `class_names`. Images are whatever the backbone's transforms
        take (PIL images). Nothing of them is kept afterwards but class statistics. All or
        nothing: if anything fails (or is interrupted) part-way, the learner is left as it
        was before the call (classes, memory, prompts and adapter).
        """
        class_names = list(class_names)
        self._validate_task(images, labels, class_names)
        with self._all_or_nothing():
            return self._learn_task(images, labels, class_names, progress)

    def extend_classes(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: Sequence[str],
        progress: ProgressCallback | None = None,
    ) -> TaskReport:
        """Learn more images of classes already learned (`labels[i]` indexes `class_names`).

        As a task: stage 1 on these images (anchored at the classes' current anchors),
        DMC-OT's calibration of the memory, then each class's statistics merged exactly
        with those of its new images (`GaussianMemory.merge_class`), then stage 2 on the
        new features and replay of the other classes. No task tokens are made: the
        classes keep their task's. All or nothing, like `learn_task`.
        """
        class_names = list(class_names)
        self._validate_images(images, labels, class_names)
        unknown = [n for n in class_names if n not in self.class_names]
        if unknown:
            raise TaskError(f"classes not learned, so they cannot be extended: {unknown}")
        with self._all_or_nothing():
            return self._extend_classes(images, labels, class_names, progress)

    def _extend_classes(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: list[str],
        progress: ProgressCallback | None,
    ) -> TaskReport:
        progress = progress or (lambda stage, step, total: None)
        # Seeded apart from `learn_task`'s seeds (task index) so the two never share one.
        seed = self.config.seed * 1_000_003 + 500_009 * (1 + self.n_tasks) + len(self.memory)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        report = TaskReport(
            task=self.n_tasks - 1,
            class_names=class_names,
            images_per_class={
                n: sum(1 for y in labels if y == i) for i, n in enumerate(class_names)
            },
        )
        indices = torch.tensor([self.class_names.index(n) for n in class_names])
        global_labels = indices[torch.tensor(list(labels), dtype=torch.long)]
        self._invalidate()
        timer = time.perf_counter()
        calibrate = self.config.uses_calibration and len(self.memory) > 0
        pixels = self._task_pixels(images)
        old_features = self._encode_pixels(pixels, progress) if calibrate else None
        report.seconds["encode_old"] = time.perf_counter() - timer

        timer = time.perf_counter()
        if self.config.stage1.epochs > 0:
            anchors = self._current_anchors(indices.tolist())
            per_task = self.config.stage1.loss_classes == "task"
            targets = [int(y) for y in labels] if per_task else global_labels.tolist()
            report.stage1_loss, report.stage1_train_accuracy = self._train_adapter(
                images, targets, anchors, generator, progress
            )
        report.seconds["stage1"] = time.perf_counter() - timer

        timer = time.perf_counter()
        new_features = self._encode_and_calibrate(
            pixels, labels, old_features, generator, report, progress
        )
        del pixels
        for index in indices.tolist():
            self.memory.merge_class(index, new_features[global_labels == index])
        progress("memory", 1, 1)
        report.seconds["memory"] = time.perf_counter() - timer

        timer = time.perf_counter()
        report.stage2_loss = self._stage2(new_features, global_labels, generator, progress)
        self._invalidate()
        report.seconds["stage2"] = time.perf_counter() - timer
        report.train_accuracy = self._feature_accuracy(new_features, global_labels)
        return report

    def _task_pixels(self, images: Sequence[Any]) -> torch.Tensor:
        """The test transform's pixels of a task's images, made once: both encoders'
        passes (before and after stage 1) read them."""
        return preprocess_all(
            images,
            self.eval_transform.to_uint8,
            self.config.feature_batch_size,
            workers=self.loader_workers,
            device=self.device,
        )

    def _encode_and_calibrate(
        self,
        pixels: torch.Tensor,
        labels: Sequence[int],
        old_features: torch.Tensor | None,
        generator: torch.Generator,
        report: TaskReport,
        progress: ProgressCallback,
    ) -> torch.Tensor:
        """The task's images under the adapted encoder; with `old_features` (the same
        images under the encoder before stage 1), DMC-OT's calibration of the memory."""
        new_features = self._encode_pixels(pixels, progress)
        if old_features is not None:
            calibration = _make_calibrator(self.config).calibrate(
                self.memory,
                old_features.to(self.device),
                new_features.to(self.device),
                torch.tensor(list(labels), dtype=torch.long),
                generator,
            )
            report.calibration = _report_calibration(calibration)
        return new_features

    def _current_anchors(self, indices: list[int]) -> torch.Tensor:
        """Stage-1 anchors for extending classes `indices`: one row per extended class
        with `loss_classes: task`, one per class with `seen`; the template or the current
        prompts, as `_anchor_features` anchors old classes."""
        cfg = self.config
        rows = indices if cfg.stage1.loss_classes == "task" else list(range(len(self.class_names)))
        with torch.inference_mode(), self._autocast():
            if cfg.stage1.anchors == "template":
                names = [self.class_names[i] for i in rows]
                tokens = self.text_tower.tokenize([cfg.prompts.template.format(n) for n in names])
                features = self.backbone.model.encode_text(tokens)
            else:
                features = self.prompts()[torch.tensor(rows)]
        return F.normalize(features.float(), dim=-1).clone()

    def remove_classes(self, class_names: Sequence[str]) -> None:
        """Forget classes: their prompt entries and Gaussian statistics go; the others
        keep their order. Predictions never return them again."""
        self._check_editable()
        names = list(class_names)
        unknown = [n for n in names if n not in self.class_names]
        if unknown:
            raise TaskError(f"classes not learned, so they cannot be removed: {unknown}")
        keep = [i for i, n in enumerate(self.class_names) if n not in set(names)]
        self.prompts.keep_classes(keep)
        self.memory.keep_classes(keep)
        self._invalidate()

    def rename_class(self, old: str, new: str) -> None:
        """Prompt a class with another name; its statistics and tokens stay."""
        self._check_editable()
        if old not in self.class_names:
            raise TaskError(f"class {old!r} is not learned, so it cannot be renamed")
        if not new or not new.strip():
            raise TaskError("class names must not be empty")
        if new in self.class_names:
            raise TaskError(f"a class named {new!r} exists already")
        self.prompts.rename_class(self.class_names.index(old), new)
        self._invalidate()

    def _check_editable(self) -> None:
        if self.merged or self.inference_only:
            raise TaskError(
                "this learner cannot change: it was merged or loaded for inference only; "
                "load the full state (part='full')"
            )

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """A task's body: in the configured determinism mode, and on any failure (or
        interruption) the learner is restored to what it was before."""
        saved = self._snapshot()
        try:
            with deterministic_algorithms(self.config.deterministic):
                yield
        except BaseException:
            self._restore_snapshot(saved)
            raise

    def _snapshot(self) -> dict[str, Any]:
        return {
            "adapter": adapter_state_dict(self.backbone.visual, self.config.adapter),
            "prompts": self.prompts.snapshot(),
            "memory": copy.deepcopy(self.memory),
        }

    def _restore_snapshot(self, saved: dict[str, Any]) -> None:
        load_adapter_state_dict(self.backbone.visual, saved["adapter"], self.config.adapter)
        self.prompts.restore_snapshot(saved["prompts"])
        self.memory = saved["memory"]
        self._invalidate()

    def _invalidate(self) -> None:
        self._prototypes = None
        self._memory_scorer = None

    def _learn_task(
        self,
        images: Sequence[Any],
        labels: Sequence[int],
        class_names: list[str],
        progress: ProgressCallback | None,
    ) -> TaskReport:
        progress = progress or (lambda stage, step, total: None)
        task_index = self.n_tasks
        seed = self.config.seed * 1_000_003 + task_index
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        report = TaskReport(
            task=task_index,
            class_names=class_names,
            images_per_class={
                n: sum(1 for y in labels if y == i) for i, n in enumerate(class_names)
            },
        )
        timer = time.perf_counter()
        first_new = len(self.class_names)
        self._invalidate()
        local_labels = torch.tensor(list(labels), dtype=torch.long)

        calibrate = self.config.uses_calibration and len(self.memory) > 0
        pixels = self._task_pixels(images)
        report.seconds["preprocess"] = time.perf_counter() - timer
        timer = time.perf_counter()
        old_features = self._encode_pixels(pixels, progress) if calibrate else None
        report.seconds["encode_old"] = time.perf_counter() - timer

        timer = time.perf_counter()
        report.stage1_loss, report.stage1_train_accuracy = self._stage1(
            images, local_labels, class_names, generator, progress
        )
        report.seconds["stage1"] = time.perf_counter() - timer

        timer = time.perf_counter()
        new_features = self._encode_and_calibrate(
            pixels, labels, old_features, generator, report, progress
        )
        del pixels
        for i in range(len(class_names)):
            self.memory.add_class(first_new + i, new_features[local_labels == i])
        progress("memory", 1, 1)
        report.seconds["memory"] = time.perf_counter() - timer

        timer = time.perf_counter()
        # The task's tokens exist from stage 2 on (METHOD.md): none in its stage-1 anchors.
        self.prompts.add_task(class_names)
        report.stage2_loss = self._stage2(
            new_features, local_labels + first_new, generator, progress
        )
        self._invalidate()
        report.seconds["stage2"] = time.perf_counter() - timer
        report.train_accuracy = self._feature_accuracy(new_features, local_labels + first_new)
        return report

    def _validate_task(
        self, images: Sequence[Any], labels: Sequence[int], class_names: list[str]
    ) -> None:
        self._validate_images(images, labels, class_names)
        known = set(class_names) & set(self.class_names)
        if known:
            raise TaskError(f"classes already learned: {sorted(known)}")

    def _validate_images(
        self, images: Sequence[Any], labels: Sequence[int], class_names: list[str]
    ) -> None:
        if self.merged:
            raise TaskError("the adapter was merged for inference; load the state again to learn")
        if self.inference_only:
            raise TaskError(
                "this learner was loaded for inference only, without its Gaussian memory; "
                "load the full state (part='full') to learn"
            )
        if not class_names:
            raise TaskError("a task needs at least one class")
        for name in class_names:
            if not name or not name.strip():
                raise TaskError("class names must not be empty")
        duplicates = {n for n in class_names if class_names.count(n) > 1}
        if duplicates:
            raise TaskError(f"class names repeat within the task: {sorted(duplicates)}")
        if len(images) != len(labels):
            raise TaskError(f"{len(images)} images but {len(labels)} labels")
        if any(not 0 <= y < len(class_names) for y in labels):
            raise TaskError(f"labels must be in [0, {len(class_names)})")
        for i, name in enumerate(class_names):
            count = sum(1 for y in labels if y == i)
            if count < self.config.min_images_per_class:
                raise TaskError(
                    f"class {name!r} has {count} images; at least "
                    f"{self.config.min_images_per_class} are needed"
                )

    def _encode_pixels(self, pixels: torch.Tensor, progress: ProgressCallback) -> torch.Tensor:
        batches = pixels.split(self.config.feature_batch_size)
        chunks = []
        with torch.inference_mode():
            for step, batch in enumerate(batches, 1):
                chunks.append(self.encode_images(batch))
                progress("encode", step, len(batches))
        return torch.cat(chunks).cpu()

    def _anchor_features(self, new_names: list[str]) -> tuple[torch.Tensor, int]:
        """Stage-1 anchors (normalised) and the global index of their first class.

        The new classes are prompted with the shared context only: their task's tokens do
        not exist yet. So DMC-OT's anchors are DMC's (the template at the first task).
        With `loss_classes: seen`, old classes are anchored at their current prompts.
        """
        cfg = self.config
        first_new = len(self.class_names)
        offset = first_new if cfg.stage1.loss_classes == "task" else 0
        with torch.inference_mode(), self._autocast():
            if cfg.stage1.anchors == "template":
                names = self.class_names[offset:] + new_names
                tokens = self.text_tower.tokenize([cfg.prompts.template.format(n) for n in names])
                features = self.backbone.model.encode_text(tokens)
            else:
                features = self.prompts.context_features(new_names)
                if offset < first_new:
                    features = torch.cat([self.prompts()[offset:], features])
        return F.normalize(features.float(), dim=-1).clone(), offset

    def _stage1(
        self,
        images: Sequence[Any],
        local_labels: torch.Tensor,
        new_names: list[str],
        generator: torch.Generator,
        progress: ProgressCallback,
    ) -> tuple[float | None, float | None]:
        if self.config.stage1.epochs <= 0:
            return None, None
        first_new = len(self.class_names)
        anchors, offset = self._anchor_features(new_names)
        targets = (local_labels + first_new - offset).tolist()
        return self._train_adapter(images, targets, anchors, generator, progress)

    def _train_adapter(
        self,
        images: Sequence[Any],
        targets: list[int],
        anchors: torch.Tensor,
        generator: torch.Generator,
        progress: ProgressCallback,
    ) -> tuple[float | None, float | None]:
        """Stage 1: the image tower's adapter against frozen text `anchors`, image i's
        target being row `targets[i]`."""
        cfg = self.config.stage1
        transform = self.train_transform if cfg.augment else self.eval_transform
        loader = image_batches(
            images,
            transform.to_uint8,
            cfg.batch_size,
            workers=self.loader_workers,
            device=self.device,
            labels=targets,
            generator=generator,
        )
        params = trainable_parameters(self.backbone.visual)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * len(loader)
        scheduler = _cosine_schedule(optimizer, total)
        # The tower stays in eval mode: batch-norm statistics are part of the frozen
        # backbone (they are not in the saved state), and LoRA needs no dropout.
        # The loss and accuracy add up on the device: no host-device sync inside a step.
        step = 0
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for _ in range(cfg.epochs):
            loss_sum.zero_()
            correct.zero_()
            for pixels, y in loader:
                y = y.to(self.device, non_blocking=True)
                features = F.normalize(self.encode_images(pixels), dim=-1)
                logits = self.logit_scale * features @ anchors.T
                loss = F.cross_entropy(logits, y)
                _optimise(optimizer, scheduler, loss)
                step += 1
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(dim=-1) == y).sum()
                progress("stage1", step, total)
        seen = len(targets)
        return float(loss_sum) / seen, int(correct) / seen

    def _stage2(
        self,
        new_features: torch.Tensor,
        global_labels: torch.Tensor,
        generator: torch.Generator,
        progress: ProgressCallback,
    ) -> float | None:
        """Stage 2: prompts on the real features of the task's classes (`global_labels`)
        and Gaussian replay of every other class in the memory."""
        cfg = self.config.stage2
        if cfg.epochs <= 0:
            return None
        present = set(global_labels.tolist())
        old_classes = [c for c in self.memory.class_indices if c not in present]
        new_counts = [int(n) for n in torch.unique(global_labels, return_counts=True)[1]]
        n_replay = replay_total(cfg, len(old_classes), new_counts)
        n_per_epoch = len(new_features) + n_replay
        # Each step runs the text tower over every class: "bounded" takes its number of
        # steps from the new data alone, and each step's batch carries its share of replay.
        per_step = len(new_features) if cfg.replay == "bounded" else n_per_epoch
        steps_per_epoch = math.ceil(per_step / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        params = self.prompts.trainable_parameters(self.config.prompts.train_old_task_tokens)
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        scheduler = _cosine_schedule(optimizer, total)
        new_x = F.normalize(new_features.to(self.device).float(), dim=-1)
        new_y = global_labels.to(self.device)
        step = 0
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.epochs):
            # The epoch's pool and order go to the device once: no host-device traffic,
            # and no sync, inside the steps.
            x, y = new_x, new_y
            counts = replay_counts(cfg, len(old_classes), new_counts, generator)
            if n_replay:
                replay_x, replay_y = self._sample_replay(old_classes, counts.tolist(), generator)
                x, y = torch.cat([x, replay_x]), torch.cat([y, replay_y])
            order, sizes = stage2_batches(cfg, len(new_x), n_replay, steps_per_epoch, generator)
            loss_sum.zero_()
            for batch in order.to(self.device).split(sizes):
                with self._autocast():
                    prototypes = F.normalize(self.prompts().float(), dim=-1)
                logits = self.logit_scale * x[batch] @ prototypes.T
                loss = F.cross_entropy(logits, y[batch])
                _optimise(optimizer, scheduler, loss)
                step += 1
                loss_sum += loss.detach() * len(batch)
                progress("stage2", step, total)
        return float(loss_sum) / n_per_epoch

    def _sample_replay(
        self, classes: list[int], counts: list[int], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised Gaussian samples (`counts[i]` of `classes[i]`) and their labels, drawn
        on the learner's device in one batched draw per distinct count (at most two)."""
        xs, ys = [], []
        for n in sorted(set(counts) - {0}):
            group = [c for c, k in zip(classes, counts, strict=True) if k == n]
            x, y = self.memory.sample_classes(group, n, generator, device=self.device)
            xs.append(x)
            ys.append(y)
        return F.normalize(torch.cat(xs).float(), dim=-1), torch.cat(ys)

    def _feature_accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = self.feature_logits(features).argmax(dim=-1).cpu()
        return float((predicted == labels).float().mean())


def stage2_batches(
    cfg: Stage2Config, n_new: int, n_replay: int, steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, list[int]]:
    """One epoch's order over [new features, replay samples] and its batch sizes.

    "per_class" (METHOD.md): one shuffled pool in batches of `batch_size`. "bounded":
    `steps` batches, each with an even share of the shuffled new features and of the
    shuffled replay samples."""
    if cfg.replay == "per_class":
        order = torch.randperm(n_new + n_replay, generator=generator)
        return order, [len(b) for b in order.split(cfg.batch_size)]
    new = torch.randperm(n_new, generator=generator).tensor_split(steps)
    replay = (torch.randperm(n_replay, generator=generator) + n_new).tensor_split(steps)
    batches = [torch.cat(pair) for pair in zip(new, replay, strict=True)]
    return torch.cat(batches), [len(b) for b in batches]


def replay_total(cfg: Stage2Config, n_old: int, new_counts: Sequence[int]) -> int:
    """Gaussian replay samples per stage-2 epoch, over all old classes (Stage2Config)."""
    if n_old == 0 or cfg.samples_per_old_class <= 0:
        return 0
    if cfg.replay == "per_class":
        return cfg.samples_per_old_class * n_old
    n_new = sum(new_counts)
    per_class = min(cfg.samples_per_old_class, math.ceil(n_new / len(new_counts)))
    return min(per_class * n_old, math.floor(cfg.replay_ratio * n_new))


def replay_counts(
    cfg: Stage2Config, n_old: int, new_counts: Sequence[int], generator: torch.Generator
) -> torch.Tensor:
    """Gaussian samples per old class for one stage-2 epoch: [n_old], summing to
    `replay_total`, equal or (when the budget binds) differing by one."""
    total = replay_total(cfg, n_old, new_counts)
    counts = torch.full((n_old,), total // max(n_old, 1), dtype=torch.long)
    remainder = total - int(counts.sum())
    if remainder:
        counts[torch.randperm(n_old, generator=generator)[:remainder]] += 1
    return counts


def _input_dtype(visual: nn.Module) -> torch.dtype:
    """The dtype of the image tower's first convolution or linear weights."""
    for module in visual.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            return module.weight.dtype
    return torch.float32


def _train_transform(train: Callable[[Any], torch.Tensor], test: PixelTransform) -> PixelTransform:
    """The train transform cut like the test one when both normalise alike (a uint8 batch
    is normalised with the test transform's mean and std); else whole (float output)."""
    cut = split_transform(train)
    if (cut.mean, cut.std) == (test.mean, test.std):
        return cut
    return PixelTransform(train)


def _make_calibrator(config: LearnerConfig) -> Calibrator:
    """The configured calibrator with the options that apply to it."""
    options = dataclasses.asdict(config.calibration)
    calibrator = get_calibrator(options.pop("method"))
    applicable = {k: v for k, v in options.items() if hasattr(calibrator, k)}
    return dataclasses.replace(calibrator, **applicable)  # type: ignore[type-var]
