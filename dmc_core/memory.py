"""Per-class Gaussian memory: the exemplar-free replay store of DMC.

Each class keeps the mean and full covariance of its un-normalised image embeddings,
in float64 on the CPU. Samples are drawn through a cached Cholesky factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GaussianMemory", "MemoryConfig"]


@dataclass
class MemoryConfig:
    """How class statistics are regularised and how sampling recovers from bad factors."""

    eps: float = 1e-4
    shrink_alpha1: float = 1.0
    shrink_alpha2: float = 1.0
    jitter_start: float = 1e-6
    jitter_max_tries: int = 8


def _as_cpu_float64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(device="cpu", dtype=torch.float64)


def _shrink(cov: torch.Tensor, alpha1: float, alpha2: float) -> torch.Tensor:
    """FeCAM/RAPF shrinkage: cov + a1*mean(diag)*I + a2*mean(offdiag)*(1-I)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype)
    diag_mean = torch.diagonal(cov).mean()
    off_diag_mean = (cov.sum() - torch.diagonal(cov).sum()) / max(d * (d - 1), 1)
    return cov + alpha1 * diag_mean * eye + alpha2 * off_diag_mean * (1.0 - eye)


def _symmetrise(cov: torch.Tensor) -> torch.Tensor:
    return 0.5 * (cov + cov.T)


class GaussianMemory:
    """Class index -> (mean [d], covariance [d, d]), float64 on CPU, in insertion order."""

    def __init__(self, config: MemoryConfig | None = None, dim: int | None = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        self._dim = dim
        self._means: dict[int, torch.Tensor] = {}
        self._covs: dict[int, torch.Tensor] = {}
        self._chol: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ access
    @property
    def class_indices(self) -> list[int]:
        return list(self._means)

    @property
    def dim(self) -> int | None:
        """Embedding dimension, or None while the memory is empty and no dim was given."""
        return self._dim

    def __len__(self) -> int:
        return len(self._means)

    def __contains__(self, class_index: object) -> bool:
        return class_index in self._means

    def mean(self, class_index: int) -> torch.Tensor:
        return self._means[self._check_known(class_index)].clone()

    def covariance(self, class_index: int) -> torch.Tensor:
        return self._covs[self._check_known(class_index)].clone()

    def _check_known(self, class_index: int) -> int:
        if class_index not in self._means:
            raise KeyError(
                f"class {class_index} is not in the memory (known: {self.class_indices})"
            )
        return class_index

    def _check_dim(self, d: int, what: str) -> None:
        if self._dim is None:
            self._dim = d
        elif d != self._dim:
            raise ValueError(f"{what} has dimension {d}, but the memory holds {self._dim}")

    # ---------------------------------------------------------------- building
    def add_class(self, class_index: int, features: torch.Tensor) -> None:
        """Store the Gaussian of one class from its un-normalised features [n, d]."""
        class_index = int(class_index)
        if class_index in self._means:
            raise ValueError(f"class {class_index} is already in the memory")
        if features.ndim != 2:
            raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
        n, d = features.shape
        if n < 2:
            raise ValueError(
                f"class {class_index} needs at least 2 feature vectors to estimate a "
                f"covariance, got {n}"
            )
        self._check_dim(d, f"features of class {class_index}")
        x = _as_cpu_float64(features)
        mean = x.mean(dim=0)
        centred = x - mean
        cov = centred.T @ centred / (n - 1)
        if n < d:
            cov = _shrink(cov, self.config.shrink_alpha1, self.config.shrink_alpha2)
        cov = _symmetrise(cov) + self.config.eps * torch.eye(d, dtype=torch.float64)
        self._means[class_index] = mean
        self._covs[class_index] = cov

    def update(
        self,
        class_index: int,
        mean: torch.Tensor | None = None,
        covariance: torch.Tensor | None = None,
    ) -> None:
        """Replace the mean and/or covariance of a stored class (used by calibration)."""
        self._check_known(class_index)
        d = self._means[class_index].shape[0]
        if mean is not None:
            if tuple(mean.shape) != (d,):
                raise ValueError(f"mean must have shape ({d},), got {tuple(mean.shape)}")
            self._means[class_index] = _as_cpu_float64(mean).clone()
        if covariance is not None:
            if tuple(covariance.shape) != (d, d):
                raise ValueError(
                    f"covariance must have shape ({d}, {d}), got {tuple(covariance.shape)}"
                )
            self._covs[class_index] = _symmetrise(_as_cpu_float64(covariance)).clone()
            self._chol.pop(class_index, None)

    # ---------------------------------------------------------------- sampling
    def cholesky(self, class_index: int) -> torch.Tensor:
        """Lower Cholesky factor of the class covariance, with jitter fallback; cached."""
        self._check_known(class_index)
        cached = self._chol.get(class_index)
        if cached is not None:
            return cached
        cov = self._covs[class_index]
        factor, info = torch.linalg.cholesky_ex(cov)
        jitter = self.config.jitter_start
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        tries = 0
        while int(info) != 0 and tries < self.config.jitter_max_tries:
            factor, info = torch.linalg.cholesky_ex(cov + jitter * eye)
            jitter *= 10.0
            tries += 1
        if int(info) != 0:
            raise RuntimeError(
                f"covariance of class {class_index} is not positive definite even with "
                f"jitter up to {jitter / 10.0:g} after {tries} tries; the memory is corrupt"
            )
        self._chol[class_index] = factor
        return factor

    def sample(self, class_index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples [n, d] (float64, CPU) from the Gaussian of one class."""
        factor = self.cholesky(class_index)
        d = factor.shape[0]
        z = torch.randn((n, d), generator=generator, dtype=torch.float64)
        return self._means[class_index] + z @ factor.T

    def sample_all(
        self, n_per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n_per_class samples of every class, in class order: (features [K, d], labels [K])."""
        if not self._means:
            d = self._dim or 0
            return torch.zeros((0, d), dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        feats = [self.sample(c, n_per_class, generator) for c in self._means]
        labels = [torch.full((n_per_class,), c, dtype=torch.long) for c in self._means]
        return torch.cat(feats), torch.cat(labels)

    # --------------------------------------------------------------- save/load
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous tensors suitable for safetensors."""
        d = self._dim or 0
        idx = torch.tensor(self.class_indices, dtype=torch.long)
        if self._means:
            means = torch.stack(list(self._means.values())).contiguous()
            covs = torch.stack(list(self._covs.values())).contiguous()
        else:
            means = torch.zeros((0, d), dtype=torch.float64)
            covs = torch.zeros((0, d, d), dtype=torch.float64)
        return {"class_indices": idx, "means": means, "covariances": covs}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: MemoryConfig | None = None
    ) -> GaussianMemory:
        idx, means, covs = state["class_indices"], state["means"], state["covariances"]
        if means.ndim != 2 or covs.ndim != 3 or idx.ndim != 1:
            raise ValueError("memory state has tensors of the wrong rank")
        c, d = means.shape
        if idx.shape[0] != c or tuple(covs.shape) != (c, d, d):
            raise ValueError(
                f"memory state shapes disagree: class_indices {tuple(idx.shape)}, "
                f"means {tuple(means.shape)}, covariances {tuple(covs.shape)}"
            )
        memory = cls(config, dim=d if d > 0 else None)
        for i, class_index in enumerate(idx.tolist()):
            if class_index in memory._means:
                raise ValueError(f"memory state lists class {class_index} twice")
            memory._means[class_index] = _as_cpu_float64(means[i]).clone()
            memory._covs[class_index] = _as_cpu_float64(covs[i]).clone()
        return memory
