"""Per-class Gaussian memory: the exemplar-free replay store of DMC.

Each class keeps its image count, the mean of its un-normalised image embeddings and a
factor of their covariance, all float32 on the CPU (float64 only inside the numerics).
The covariance is held only as a factor, never twice:

- `covariance="full"`: the lower Cholesky factor L (covariance = L L^T);
- `covariance="low_rank"`: F [d, rank] and a diagonal psi (covariance = F F^T + diag(psi)),
  fitted from the top eigenpairs, with psi keeping each dimension's variance.

Sampling is exact for either form, batched over classes in one matmul on any device.

A class can be extended with more images (`merge_class`): besides count, mean and
covariance factor, each class keeps the shrinkage intensity its covariance was
regularised with and two centred moments (sum |y|^2 y, sum |y|^4) that Ledoit-Wolf's
intensity needs, so the merged statistics equal one pass over all the images. The merge
works on what is stored: a low-rank covariance is merged as the low-rank matrix it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["GaussianMemory", "MemoryConfig", "fecam_shrink", "shrink_covariance"]

STORE_DTYPE = torch.float32
# Bytes of factors moved to the sampling device at once by `sample_classes`.
_SAMPLE_CHUNK_BYTES = 256 * 2**20


@dataclass
class MemoryConfig:
    """How class statistics are regularised, stored, and repaired when not definite."""

    eps: float = 1e-4
    # "ledoit_wolf": (1 - rho) S + rho * mean(diag S) I with Ledoit-Wolf's rho, which
    # falls as n/d grows (the trace is kept); "below_dim": METHOD.md's FeCAM/RAPF rule,
    # S + a1 mean(diag) I + a2 mean(offdiag) (1 - I) only when n < d; "none".
    shrinkage: Literal["ledoit_wolf", "below_dim", "none"] = "ledoit_wolf"
    shrink_alpha1: float = 1.0
    shrink_alpha2: float = 1.0
    covariance: Literal["full", "low_rank"] = "full"
    rank: int = 64  # of the low-rank part when covariance == "low_rank"
    jitter_start: float = 1e-6
    jitter_max_tries: int = 8


def fecam_shrink(cov: torch.Tensor, alpha1: float, alpha2: float) -> torch.Tensor:
    """FeCAM/RAPF shrinkage: cov + a1*mean(diag)*I + a2*mean(offdiag)*(1-I)."""
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    diag_mean = torch.diagonal(cov).mean()
    off_diag_mean = (cov.sum() - torch.diagonal(cov).sum()) / max(d * (d - 1), 1)
    return cov + alpha1 * diag_mean * eye + alpha2 * off_diag_mean * (1.0 - eye)


def ledoit_wolf_intensity(centred: torch.Tensor) -> float:
    """Ledoit-Wolf (2004) shrinkage intensity towards mu*I for centred samples [n, d]."""
    moments = Moments.of(centred)
    return _ledoit_wolf(moments.scatter, moments.n, moments.fourth)


def _ledoit_wolf(scatter: torch.Tensor, n: int, fourth: torch.Tensor | float) -> float:
    """The intensity from the sufficient statistics: scatter = sum y y^T and fourth =
    sum |y|^4 of the n centred samples (sum over i, j of (y_i^2)(y_j^2) is |y|^4)."""
    d = scatter.shape[0]
    emp = scatter / n
    mu = torch.diagonal(emp).mean()
    # beta: how noisy the sample covariance is; delta: its distance to mu*I.
    beta = (float(fourth) / n - float((emp**2).sum())) / (n * d)
    delta = ((emp - mu * torch.eye(d, dtype=emp.dtype, device=emp.device)) ** 2).sum() / d
    if float(delta) <= 0.0:
        return 1.0
    return min(1.0, max(0.0, beta / float(delta)))


@dataclass
class Moments:
    """Sufficient statistics of n samples for an exact merge: their mean, the scatter
    sum (x - mean)(x - mean)^T, and the centred third and fourth moments sum |y|^2 y and
    sum |y|^4 (y = x - mean), all float64."""

    n: int
    mean: torch.Tensor
    scatter: torch.Tensor
    third: torch.Tensor
    fourth: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor) -> Moments:
        x = features.detach().to(torch.float64)
        mean = x.mean(dim=0)
        y = x - mean
        norms = (y**2).sum(dim=1)
        return cls(x.shape[0], mean, y.T @ y, norms @ y, (norms**2).sum())

    def moved(self, mean: torch.Tensor) -> Moments:
        """The same samples' moments about another centre `mean` (scatter stays central)."""
        delta = mean - self.mean
        c = float(delta @ delta)
        trace = torch.trace(self.scatter)
        s_delta = self.scatter @ delta
        third = self.third - trace * delta - 2.0 * s_delta - self.n * c * delta
        fourth = (
            self.fourth
            - 4.0 * (delta @ self.third)
            + 4.0 * (delta @ s_delta)
            + 2.0 * c * trace
            + self.n * c * c
        )
        return Moments(self.n, mean, self.scatter, third, fourth)

    def merged(self, other: Moments) -> Moments:
        """The moments of both sets of samples together (Chan et al.'s pairwise update)."""
        n = self.n + other.n
        mean = (self.n * self.mean + other.n * other.mean) / n
        gap = other.mean - self.mean
        scatter = self.scatter + other.scatter + (self.n * other.n / n) * torch.outer(gap, gap)
        a, b = self.moved(mean), other.moved(mean)
        return Moments(n, mean, scatter, a.third + b.third, a.fourth + b.fourth)


def regularised_covariance(moments: Moments, config: MemoryConfig) -> tuple[torch.Tensor, float]:
    """The stored covariance [d, d] (float64, eps*I included) of samples with these moments,
    and the shrinkage intensity applied (Ledoit-Wolf's rho; 1 or 0 for FeCAM's rule)."""
    n, d = moments.n, moments.scatter.shape[0]
    cov = moments.scatter / (n - 1)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    intensity = 0.0
    if config.shrinkage == "ledoit_wolf":
        intensity = _ledoit_wolf(moments.scatter, n, moments.fourth)
        cov = (1.0 - intensity) * cov + intensity * torch.diagonal(cov).mean() * eye
    elif config.shrinkage == "below_dim" and n < d:
        cov = fecam_shrink(cov, config.shrink_alpha1, config.shrink_alpha2)
        intensity = 1.0
    elif config.shrinkage not in ("ledoit_wolf", "below_dim", "none"):
        raise ValueError(f"unknown shrinkage {config.shrinkage!r}")
    return 0.5 * (cov + cov.T) + config.eps * eye, intensity


def sample_covariance(stored: torch.Tensor, intensity: float, config: MemoryConfig) -> torch.Tensor:
    """Inverse of `regularised_covariance`: the unregularised covariance of a stored one.
    Exact while the intensity is below 1; a fully shrunk Ledoit-Wolf covariance has lost
    its structure, so its target (mean variance times I) stands in for it."""
    d = stored.shape[0]
    eye = torch.eye(d, dtype=stored.dtype, device=stored.device)
    cov = stored - config.eps * eye
    if config.shrinkage == "ledoit_wolf" and intensity > 0.0:
        target = torch.diagonal(cov).mean() * eye
        if intensity >= 1.0:
            return target
        return (cov - intensity * target) / (1.0 - intensity)
    if config.shrinkage == "below_dim" and intensity > 0.0:
        diag_mean = torch.diagonal(cov).mean() / (1.0 + config.shrink_alpha1)
        off_mean = (cov.sum() - torch.diagonal(cov).sum()) / max(d * (d - 1), 1)
        off_mean = off_mean / (1.0 + config.shrink_alpha2)
        return (
            cov
            - config.shrink_alpha1 * diag_mean * eye
            - config.shrink_alpha2 * off_mean * (1.0 - eye)
        )
    return cov


def shrink_covariance(features: torch.Tensor, config: MemoryConfig) -> torch.Tensor:
    """Regularised float64 covariance [d, d] of features [n, d], eps*I included."""
    return regularised_covariance(Moments.of(features), config)[0]


@dataclass
class _ClassStats:
    count: int
    mean: torch.Tensor  # [d] float32
    factor: torch.Tensor  # [d, d] lower Cholesky, or [d, rank]; float32
    diagonal: torch.Tensor | None  # [d] float32 (low rank only)
    # For `merge_class`: the shrinkage intensity the covariance holds, and the centred
    # moments sum |y|^2 y [d] and sum |y|^4 (zero in states saved before them).
    shrinkage: float = 0.0
    third: torch.Tensor | None = None
    fourth: float = 0.0

    def nbytes(self) -> int:
        tensors = [self.mean, self.factor] + ([self.diagonal] if self.diagonal is not None else [])
        if self.third is not None:
            tensors.append(self.third)
        return sum(t.numel() * t.element_size() for t in tensors)


class GaussianMemory:
    """Class index -> (count, mean [d], covariance factor), in insertion order."""

    def __init__(self, config: MemoryConfig | None = None, dim: int | None = None) -> None:
        self.config = config if config is not None else MemoryConfig()
        if self.config.covariance not in ("full", "low_rank"):
            raise ValueError(f"unknown covariance form {self.config.covariance!r}")
        if self.config.covariance == "low_rank" and self.config.rank < 1:
            raise ValueError("memory.rank must be >= 1 for a low-rank covariance")
        self._dim = dim
        self._stats: dict[int, _ClassStats] = {}

    # ------------------------------------------------------------------ access
    @property
    def class_indices(self) -> list[int]:
        return list(self._stats)

    @property
    def dim(self) -> int | None:
        """Embedding dimension, or None while the memory is empty and no dim was given."""
        return self._dim

    def __len__(self) -> int:
        return len(self._stats)

    def __contains__(self, class_index: object) -> bool:
        return class_index in self._stats

    def count(self, class_index: int) -> int:
        """Number of images the statistics of the class were computed from."""
        return self._get(class_index).count

    def mean(self, class_index: int) -> torch.Tensor:
        """Mean [d], float64 (a copy)."""
        return self._get(class_index).mean.to(torch.float64)

    def covariance(self, class_index: int) -> torch.Tensor:
        """Dense covariance [d, d], float64, rebuilt from the stored factor."""
        return self.covariances([class_index])[0]

    def covariances(
        self, class_indices: Sequence[int], device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Dense float64 covariances [k, d, d] of several classes, on `device` (CPU)."""
        stats = [self._get(c) for c in class_indices]
        d = self._dim or 0
        if not stats:
            return torch.zeros((0, d, d), dtype=torch.float64, device=device)
        factors = torch.stack([s.factor for s in stats]).to(device=device, dtype=torch.float64)
        cov = factors @ factors.transpose(1, 2)
        if stats[0].diagonal is not None:
            diag = torch.stack([s.diagonal for s in stats])  # type: ignore[misc]
            cov = cov + torch.diag_embed(diag.to(device=device, dtype=torch.float64))
        return 0.5 * (cov + cov.transpose(1, 2))

    def nbytes(self) -> int:
        """Bytes held by the statistics of all classes."""
        return sum(s.nbytes() for s in self._stats.values())

    def _get(self, class_index: int) -> _ClassStats:
        stats = self._stats.get(class_index)
        if stats is None:
            raise KeyError(
                f"class {class_index} is not in the memory (known: {self.class_indices})"
            )
        return stats

    def _check_dim(self, d: int, what: str) -> None:
        if self._dim is None:
            self._dim = d
        elif d != self._dim:
            raise ValueError(f"{what} has dimension {d}, but the memory holds {self._dim}")

    # ---------------------------------------------------------------- building
    def add_class(self, class_index: int, features: torch.Tensor) -> None:
        """Store the Gaussian of one class from its un-normalised features [n, d]."""
        class_index = int(class_index)
        if class_index in self._stats:
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
        self._store(class_index, Moments.of(features))

    def _store(self, class_index: int, moments: Moments) -> None:
        cov, intensity = regularised_covariance(moments, self.config)
        factors, diagonals = self._factorise(cov[None], [class_index])
        self._stats[class_index] = _ClassStats(
            count=moments.n,
            mean=moments.mean.to("cpu", STORE_DTYPE),
            factor=factors[0],
            diagonal=None if diagonals is None else diagonals[0],
            shrinkage=intensity,
            third=moments.third.to("cpu", STORE_DTYPE),
            fourth=float(moments.fourth),
        )

    def moments(self, class_index: int) -> Moments:
        """The class's sufficient statistics, recovered from what is stored (its current,
        possibly calibrated, mean and covariance)."""
        s = self._get(class_index)
        d = self._dim or 0
        scatter = sample_covariance(self.covariance(class_index), s.shrinkage, self.config)
        third = s.third if s.third is not None else torch.zeros(d, dtype=torch.float64)
        return Moments(
            s.count,
            s.mean.to(torch.float64),
            scatter * (s.count - 1),
            third.to(torch.float64),
            torch.tensor(s.fourth, dtype=torch.float64),
        )

    def merge_class(self, class_index: int, features: torch.Tensor) -> None:
        """Extend a stored class with more un-normalised features [n, d]: its count, mean
        and covariance become those of one pass over all its images (exact for the full
        covariance; a low-rank one merges the matrix it stores)."""
        class_index = int(class_index)
        current = self.moments(class_index)
        if features.ndim != 2 or features.shape[1] != current.mean.shape[0]:
            raise ValueError(
                f"features must be [n, {current.mean.shape[0]}], got {tuple(features.shape)}"
            )
        if features.shape[0] < 1:
            raise ValueError(f"no features to extend class {class_index} with")
        self._store(class_index, current.merged(Moments.of(features)))

    def keep_classes(self, class_indices: Sequence[int]) -> None:
        """Keep only these classes, renumbered 0..k-1 in the given order (a removal)."""
        stats = [self._get(int(c)) for c in class_indices]
        self._stats = dict(enumerate(stats))

    def remove_class(self, class_index: int) -> None:
        """Forget a class's statistics."""
        self._get(class_index)
        del self._stats[class_index]

    def update(
        self,
        class_index: int,
        mean: torch.Tensor | None = None,
        covariance: torch.Tensor | None = None,
    ) -> None:
        """Replace the mean and/or covariance of a stored class (used by calibration)."""
        self.update_many(
            [class_index],
            None if mean is None else mean[None],
            None if covariance is None else covariance[None],
        )

    def update_many(
        self,
        class_indices: Sequence[int],
        means: torch.Tensor | None = None,
        covariances: torch.Tensor | None = None,
    ) -> None:
        """`update` for several classes at once ([k, d] means, [k, d, d] covariances):
        the factorisations run batched on the device of `covariances`."""
        stats = [self._get(c) for c in class_indices]
        k, d = len(stats), self._dim or 0
        if means is not None and tuple(means.shape) != (k, d):
            raise ValueError(f"mean must have shape ({d},), got {tuple(means.shape[1:])}")
        if covariances is not None and tuple(covariances.shape) != (k, d, d):
            raise ValueError(
                f"covariance must have shape ({d}, {d}), got {tuple(covariances.shape[1:])}"
            )
        factors = diagonals = None
        if covariances is not None:
            factors, diagonals = self._factorise(covariances, list(class_indices))
        for i, s in enumerate(stats):
            # In place: a calibration rewriting every class then needs no second memory.
            if means is not None:
                s.mean.copy_(means[i].detach())
            if factors is not None:
                s.factor.copy_(factors[i])
                if s.diagonal is not None and diagonals is not None:
                    s.diagonal.copy_(diagonals[i])

    def _factorise(
        self, covariances: torch.Tensor, class_indices: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 CPU factors of float64 covariances [k, d, d], batched."""
        cov = covariances.detach().to(torch.float64)
        cov = 0.5 * (cov + cov.transpose(1, 2))
        if self.config.covariance == "low_rank":
            factors, diagonals = _low_rank(cov, self.config.rank, self.config.eps)
            return factors.to("cpu", STORE_DTYPE), diagonals.to("cpu", STORE_DTYPE)
        return self._cholesky(cov, class_indices).to("cpu", STORE_DTYPE), None

    def _cholesky(self, cov: torch.Tensor, class_indices: list[int]) -> torch.Tensor:
        """Batched lower Cholesky factors, with growing jitter for those that fail."""
        factor, info = torch.linalg.cholesky_ex(cov)
        failed = (info != 0).nonzero().flatten()
        jitter, tries = self.config.jitter_start, 0
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        while failed.numel() and tries < self.config.jitter_max_tries:
            retry, info = torch.linalg.cholesky_ex(cov[failed] + jitter * eye)
            factor[failed] = retry
            failed = failed[info != 0]
            jitter *= 10.0
            tries += 1
        if failed.numel():
            bad = [class_indices[i] for i in failed.tolist()]
            raise RuntimeError(
                f"covariance of class(es) {bad} is not positive definite even with jitter "
                f"up to {jitter / 10.0:g} after {tries} tries; refusing to store it"
            )
        return factor

    # ---------------------------------------------------------------- sampling
    def sample(self, class_index: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples [n, d] (float32, on the generator's device) from one class."""
        return self.sample_classes([class_index], n, generator)[0]

    def sample_all(
        self, n_per_class: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n_per_class samples of every class, in class order: (features [K, d], labels [K])."""
        return self.sample_classes(self.class_indices, n_per_class, generator)

    def sample_classes(
        self,
        class_indices: Sequence[int],
        n_per_class: int,
        generator: torch.Generator | Sequence[torch.Generator],
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """n_per_class samples of each listed class: (features [K, d] float32, labels [K]).

        Drawn on `device` (default: the generator's) in batched matmuls. A generator on
        another device seeds one there, so the result depends on the generator only.
        With one generator per class (on `device`), each class's samples depend only on
        its own generator, whatever else is drawn with it.
        """
        per_class_generators = not isinstance(generator, torch.Generator)
        first = generator if isinstance(generator, torch.Generator) else generator[0]
        target = torch.device(device) if device is not None else first.device
        d = self._dim or 0
        classes = [int(c) for c in class_indices]
        labels = torch.tensor(classes, dtype=torch.long, device=target)
        labels = labels.repeat_interleave(n_per_class)
        stats = [self._get(c) for c in classes]
        if not stats or n_per_class <= 0:
            return torch.zeros((0, d), dtype=STORE_DTYPE, device=target), labels
        if per_class_generators:
            if len(generator) != len(stats):  # type: ignore[arg-type]
                raise ValueError("give one generator per class, or a single generator")
        elif target != first.device:
            seed = int(torch.randint(2**62, (1,), generator=first, device=first.device))
            first = torch.Generator(device=target).manual_seed(seed)
        rank = stats[0].factor.shape[-1]
        low_rank = stats[0].diagonal is not None
        width = rank + d if low_rank else rank
        chunk = max(1, _SAMPLE_CHUNK_BYTES // max(stats[0].nbytes(), 1))
        parts = []
        for start in range(0, len(stats), chunk):
            group = stats[start : start + chunk]
            shape = (n_per_class, width)
            if per_class_generators:
                gens = generator[start : start + chunk]  # type: ignore[index]
                z = torch.stack(
                    [
                        torch.randn(shape, generator=g, device=target, dtype=STORE_DTYPE)
                        for g in gens
                    ]
                )
            else:
                z = torch.randn(
                    (len(group), *shape), generator=first, device=target, dtype=STORE_DTYPE
                )
            means = torch.stack([s.mean for s in group]).to(target)
            factors = torch.stack([s.factor for s in group]).to(target)
            x = means[:, None, :] + z[..., :rank] @ factors.transpose(1, 2)
            if low_rank:
                diag = torch.stack([s.diagonal for s in group])  # type: ignore[misc]
                x = x + diag.to(target).sqrt()[:, None, :] * z[..., rank:]
            parts.append(x.reshape(-1, d))
        return torch.cat(parts), labels

    # --------------------------------------------------------------- save/load
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat, contiguous tensors for safetensors; every tensor's first dimension is the
        class, in `class_indices` order, so states split per class concatenate back.

        Full covariances are saved as the packed lower triangle of their Cholesky factor.
        """
        d = self._dim or 0
        stats = list(self._stats.values())
        state = {
            "class_indices": torch.tensor(self.class_indices, dtype=torch.long),
            "counts": torch.tensor([s.count for s in stats], dtype=torch.long),
            "means": _stack([s.mean for s in stats], (d,)),
            "shrinkage": torch.tensor([s.shrinkage for s in stats], dtype=STORE_DTYPE),
            "third_moments": _stack(
                [s.third if s.third is not None else torch.zeros(d) for s in stats], (d,)
            ),
            "fourth_moments": torch.tensor([s.fourth for s in stats], dtype=STORE_DTYPE),
        }
        if self.config.covariance == "low_rank":
            r = min(self.config.rank, d)
            state["factors"] = _stack([s.factor for s in stats], (d, r))
            state["diagonals"] = _stack([s.diagonal for s in stats], (d,))  # type: ignore[misc]
        else:
            rows, cols = torch.tril_indices(d, d)
            state["cholesky_packed"] = _stack(
                [s.factor[rows, cols] for s in stats], (rows.numel(),)
            )
        return state

    @classmethod
    def from_state_dict(
        cls, state: dict[str, torch.Tensor], config: MemoryConfig | None = None
    ) -> GaussianMemory:
        """Inverse of `state_dict` (or of a concatenation of several along dimension 0).

        Also reads the former float64 layout (`covariances` [C, d, d], no counts). A state
        in the other covariance form than `config` asks for is converted.
        """
        idx, means = state["class_indices"], state["means"]
        if means.ndim != 2 or idx.ndim != 1:
            raise ValueError("memory state has tensors of the wrong rank")
        c, d = means.shape
        for name, tensor in state.items():
            if tensor.shape[0] != c:
                raise ValueError(
                    f"memory state shapes disagree: {name} {tuple(tensor.shape)} but "
                    f"means {tuple(means.shape)}"
                )
        if len(set(idx.tolist())) != c:
            raise ValueError("memory state lists a class twice")
        memory = cls(config, dim=d if d > 0 else None)
        counts = state.get("counts")
        form = "low_rank" if "factors" in state else "full"
        covariances = None
        if "covariances" in state:  # former layout
            covariances = state["covariances"]
            if tuple(covariances.shape) != (c, d, d):
                raise ValueError(f"memory state covariances have shape {tuple(covariances.shape)}")
        elif form != memory.config.covariance:
            covariances = _state_covariances(state, d)
        factors = diagonals = None
        if covariances is None:
            factors, diagonals = _state_factors(state, d)
        elif c:
            factors, diagonals = memory._factorise(covariances, idx.tolist())
        shrinkage, third, fourth = (
            state.get("shrinkage"),
            state.get("third_moments"),
            state.get("fourth_moments"),
        )
        for i, class_index in enumerate(idx.tolist()):
            assert factors is not None
            memory._stats[class_index] = _ClassStats(
                count=int(counts[i]) if counts is not None else 0,
                mean=means[i].to("cpu", STORE_DTYPE).clone(),
                factor=factors[i].to("cpu", STORE_DTYPE).clone(),
                diagonal=None if diagonals is None else diagonals[i].to("cpu", STORE_DTYPE).clone(),
                shrinkage=float(shrinkage[i]) if shrinkage is not None else 0.0,
                third=None if third is None else third[i].to("cpu", STORE_DTYPE).clone(),
                fourth=float(fourth[i]) if fourth is not None else 0.0,
            )
        return memory


def _stack(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    if not tensors:
        return torch.zeros((0, *shape), dtype=STORE_DTYPE)
    return torch.stack(tensors).contiguous()


def _state_factors(
    state: dict[str, torch.Tensor], d: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if "factors" in state:
        return state["factors"], state["diagonals"]
    packed = state["cholesky_packed"]
    rows, cols = torch.tril_indices(d, d)
    if packed.ndim != 2 or packed.shape[1] != rows.numel():
        raise ValueError(f"memory state cholesky_packed has shape {tuple(packed.shape)}")
    factors = torch.zeros((packed.shape[0], d, d), dtype=packed.dtype)
    factors[:, rows, cols] = packed
    return factors, None


def _state_covariances(state: dict[str, torch.Tensor], d: int) -> torch.Tensor:
    factors, diagonals = _state_factors(state, d)
    f = factors.to(torch.float64)
    cov = f @ f.transpose(1, 2)
    if diagonals is not None:
        cov = cov + torch.diag_embed(diagonals.to(torch.float64))
    return cov


def _low_rank(cov: torch.Tensor, rank: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F [k, d, r] and psi [k, d] >= eps with diag(F F^T + psi) = diag(cov).

    As probabilistic PCA: F spans the top r eigenvectors with eigenvalues less the mean
    sigma^2 of the others, which psi carries. (Taking the top eigenvalues whole would
    take sigma^2 out of psi along r of the d directions and shrink the rest of the
    spectrum a little at every refit, e.g. at every calibration.)
    """
    d = cov.shape[-1]
    r = min(rank, d)
    vals, vecs = torch.linalg.eigh(cov)
    rest = vals[:, : d - r].mean(dim=1, keepdim=True) if r < d else torch.zeros_like(vals[:, :1])
    top_vals, top_vecs = (vals[:, -r:] - rest).clamp_min(0.0), vecs[:, :, -r:]
    factors = top_vecs * top_vals.sqrt()[:, None, :]
    residual = torch.diagonal(cov, dim1=1, dim2=2) - (factors**2).sum(dim=-1)
    return factors, residual.clamp_min(eps)
