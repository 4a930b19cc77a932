"""Scores of image features against per-class statistics: cosine to the class means, the
Gaussian log-likelihood term -d^2/2 of the Mahalanobis distance d, or FeCAM's Mahalanobis
score (L2-normalised features, shrunk covariances normalised to correlation matrices).

Used by the learner's memory-fused inference (the Gaussian memory's means and
covariances under the adapted encoder) and by the SimpleCIL / FeCAM baselines (means and
covariances of frozen features).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dmc_core.memory import GaussianMemory, fecam_shrink

__all__ = [
    "MemoryScorer",
    "cosine_scores",
    "fecam_precisions",
    "mahalanobis_scores",
    "precision_matrices",
]

ScoreKind = Literal["cosine", "mahalanobis", "fecam"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("cosine", "mahalanobis", "fecam")
# The most bytes a Mahalanobis score holds at once (its differences and their products).
SCORE_BLOCK_BYTES = 64 * 2**20


def cosine_scores(features: torch.Tensor, means: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * cos(x, mean_c): [n, C]."""
    x = F.normalize(features.float(), dim=-1)
    return scale * x @ F.normalize(means.float(), dim=-1).T


def precision_matrices(covariances: torch.Tensor) -> torch.Tensor:
    """Inverses [C, d, d] of symmetric covariances [C, d, d] (pseudo-inverse: a singular
    covariance scores its null space as zero distance instead of failing)."""
    return torch.linalg.pinv(covariances.double(), hermitian=True)


def fecam_precisions(covariances: torch.Tensor, alpha1: float, alpha2: float) -> torch.Tensor:
    """FeCAM's (Goswami et al. 2023) matrices [C, d, d]: each covariance shrunk with
    `fecam_shrink`, normalised to a correlation matrix, inverted."""
    shrunk = torch.stack([fecam_shrink(c, alpha1, alpha2) for c in covariances.double()])
    std = torch.diagonal(shrunk, dim1=-2, dim2=-1).sqrt()
    return precision_matrices(shrunk / (std[:, :, None] * std[:, None, :]))


def mahalanobis_scores(
    features: torch.Tensor,
    means: torch.Tensor,
    precisions: torch.Tensor,
    block_bytes: int = SCORE_BLOCK_BYTES,
) -> torch.Tensor:
    """-d^2 / 2 with d^2 = (x - mean_c)^T P_c (x - mean_c): [n, C].

    Computed a block of classes at a time (one batched matrix product per block, float64):
    the differences of n features to C means take n * C * d numbers, 2 GiB at 849
    classes, which would otherwise be held at once."""
    x = features.double()
    n, d = x.shape
    block = max(1, block_bytes // max(2 * n * d * x.element_size(), 1))
    columns = []
    for start in range(0, len(means), block):
        diff = x[None] - means[start : start + block, None, :].double()
        weighted = torch.matmul(diff, precisions[start : start + block].double())
        columns.append((weighted * diff).sum(dim=-1).T)
    return (-0.5 * torch.cat(columns, dim=1)).float()


class MemoryScorer:
    """Scores against the Gaussian memory's classes 0..n_classes-1, in class order.

    "fecam" scores the L2-normalised features against the normalised means with FeCAM's
    matrices of the memory's covariances (`shrink`: its alphas); the correlation
    normalisation makes them independent of the features' scale."""

    def __init__(
        self,
        memory: GaussianMemory,
        n_classes: int,
        kind: ScoreKind,
        scale: float,
        device: torch.device,
        shrink: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        missing = [c for c in range(n_classes) if c not in memory.class_indices]
        if missing:
            raise ValueError(f"the memory holds no statistics of classes {missing}")
        if kind not in SCORE_KINDS:
            raise ValueError(f"memory score must be one of {SCORE_KINDS}, got {kind!r}")
        self.memory, self.kind, self.scale, self.shrink = memory, kind, scale, shrink
        means = torch.stack([memory.mean(c) for c in range(n_classes)])
        self.means = (F.normalize(means, dim=-1) if kind == "fecam" else means).to(device)
        self.precisions: torch.Tensor | None = None
        if kind != "cosine":
            covariances = memory.covariances(range(n_classes))
            if kind == "fecam":
                self.precisions = fecam_precisions(covariances, *shrink).to(device)
            else:
                self.precisions = precision_matrices(covariances).to(device)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.precisions is None:
            return cosine_scores(features, self.means, self.scale)
        if self.kind == "fecam":
            features = F.normalize(features.double(), dim=-1)
        return mahalanobis_scores(features, self.means, self.precisions)
