"""Evaluating a method after a task: the accuracy on every task so far (`evaluate`) over
cached features (`features`), and METHOD.md's memory-alignment diagnostic (`diagnose`)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dmc_core.calibration import mean_alignment
from dmc_core.data.images import ClassificationDataset, Split
from dmc_core.experiment.config import ExperimentConfig
from dmc_core.experiment.features import FeatureCache, hash_indices
from dmc_core.experiment.methods import Method
from dmc_core.experiment.plan import SeedPlan


class Evaluator:
    """Evaluates the methods of one experiment on its dataset."""

    def __init__(
        self,
        config: ExperimentConfig,
        dataset: ClassificationDataset,
        cache: FeatureCache,
        *,
        show_progress: bool,
    ) -> None:
        self.config = config
        self.dataset = dataset
        self.cache = cache
        self.show_progress = show_progress

    def features(
        self,
        method: Method,
        encoder: str,
        split: Split,
        split_name: str,
        classes: Sequence[int],
        indices: dict[int, np.ndarray],
        desc: str,
    ) -> dict[int, torch.Tensor]:
        """Features of each class's images under the method's current encoder (cached)."""
        batch_size = self.config.evaluation.batch_size
        learner_config = method.config
        base = {
            "backbone": self.config.backbone.spec().id,
            "channels_last": self.config.backbone.channels_last,
            "precision": learner_config.precision,
            "device": torch.device(learner_config.device).type,
            "encoder": encoder,
            "dataset": self.dataset.fingerprint,
            "split": split_name,
            "transform": repr(method.preprocess),
            "batch_size": batch_size,
        }
        parts = {c: {**base, "class": c, "images": hash_indices(indices[c])} for c in classes}
        missing = [c for c in classes if not self.cache.contains(FeatureCache.key(parts[c]))]
        total = sum(len(indices[c]) for c in missing)
        bar = tqdm(
            total=total,
            desc=desc,
            unit="img",
            leave=False,
            file=sys.stderr,
            disable=not self.show_progress or total == 0,
        )

        def encode(c: int) -> torch.Tensor:
            chunks = []
            for pixels in method.pixel_batches(split.images.subset(indices[c]), batch_size):
                chunks.append(method.encode(pixels))
                bar.update(len(pixels))
            return torch.cat(chunks)

        try:
            return {
                c: self.cache.get_or_compute(parts[c], functools.partial(encode, c))
                for c in classes
            }
        finally:
            bar.close()

    def evaluate(
        self, method: Method, plan: SeedPlan, t: int, encoder: str, prefix: str
    ) -> list[int]:
        """correct[j] for every task j <= t, over all classes seen so far."""
        split = self.dataset.split(plan.eval_split)
        classes = [c for task in plan.tasks[: t + 1] for c in task]
        features = self.features(
            method, encoder, split, plan.eval_split, classes, plan.eval_index, f"{prefix} evaluate"
        )
        n_seen = len(classes)
        # Scored in batches across classes: a method's scoring has a cost per call (FeCAM
        # reads every class's matrix), and a class may have one evaluation image.
        stacked = torch.cat([features[c] for c in classes])
        labels = torch.cat([torch.full((len(features[c]),), plan.positions[c]) for c in classes])
        hits = []
        for batch in torch.arange(len(stacked)).split(self.config.evaluation.batch_size):
            scores = method.logits(stacked[batch])
            if scores.shape[1] != n_seen:
                raise RuntimeError(
                    f"{method.name} scores {scores.shape[1]} classes, {n_seen} are seen"
                )
            hits.append(scores.argmax(dim=1).cpu() == labels[batch])
        task_sizes = [sum(len(features[c]) for c in task) for task in plan.tasks[: t + 1]]
        return [int(h.sum()) for h in torch.cat(hits).split(task_sizes)]

    @staticmethod
    def memory_means(method: Method) -> dict[int, torch.Tensor] | None:
        learner = method.learner
        if learner is None or len(learner.memory) == 0:
            return None
        return {c: learner.memory.mean(c) for c in learner.memory.class_indices}

    def diagnose(
        self,
        method: Method,
        plan: SeedPlan,
        t: int,
        before: dict[int, torch.Tensor],
        encoder: str,
        prefix: str,
    ) -> dict[str, Any]:
        """METHOD.md's diagnostic: cosine between each old class's memory mean and its true
        mean under the new encoder (its train images), before and after calibration."""
        learner = method.learner
        assert learner is not None
        old = sorted(before)
        seen = [c for task in plan.tasks[: t + 1] for c in task]
        dataset_ids = [seen[p] for p in old]
        features = self.features(
            method,
            encoder,
            self.dataset.train,
            "train",
            dataset_ids,
            plan.train_index,
            f"{prefix} diagnose",
        )
        true = torch.stack([features[c].double().mean(dim=0) for c in dataset_ids])
        stale = torch.stack([before[p] for p in old])
        calibrated = torch.stack([learner.memory.mean(p) for p in old])
        cos_before = mean_alignment(stale, true)
        cos_after = mean_alignment(calibrated, true)
        dist_before = torch.linalg.vector_norm(stale - true, dim=1)
        dist_after = torch.linalg.vector_norm(calibrated - true, dim=1)
        return {
            "classes": dataset_ids,
            "cosine_before": cos_before.tolist(),
            "cosine_after": cos_after.tolist(),
            "mean_cosine_before": float(cos_before.mean()),
            "mean_cosine_after": float(cos_after.mean()),
            "distance_before": dist_before.tolist(),
            "distance_after": dist_after.tolist(),
            "mean_distance_before": float(dist_before.mean()),
            "mean_distance_after": float(dist_after.mean()),
        }
