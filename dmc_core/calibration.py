"""Optimal-transport calibration of the Gaussian memory (DMC-OT, part (a)).

When stage 1 changes the image encoder, the stored statistics of old classes were
measured with the old encoder. The new task's images X are embedded by both encoders
(A = f_old(X), B = f_new(X), drift D = B - A) and the old statistics are moved along D.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import ot
import torch
import torch.nn.functional as F

from dmc_core.memory import GaussianMemory

__all__ = [
    "BuresCalibrator",
    "CalibrationReport",
    "Calibrator",
    "ClassLevelCalibrator",
    "NoCalibration",
    "SinkhornCalibrator",
    "get_calibrator",
    "list_calibrators",
    "mean_alignment",
    "register_calibrator",
]


@dataclass
class CalibrationReport:
    """What a calibration did to each old class (same order as class_indices)."""

    method: str
    class_indices: list[int] = field(default_factory=list)
    mean_shift: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    covariance_shift: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.float64)
    )
    # L1 violation of the plan's marginals (0 = exact); None where no plan is solved.
    marginal_error: float | None = None


class Calibrator(ABC):
    """Moves the old classes of a memory along the encoder drift, in place."""

    name: str = ""

    @abstractmethod
    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport: ...


_CALIBRATORS: dict[str, type[Calibrator]] = {}


def register_calibrator(name: str) -> Callable[[type[Calibrator]], type[Calibrator]]:
    """Class decorator that makes a calibrator available to get_calibrator(name)."""

    def decorate(cls: type[Calibrator]) -> type[Calibrator]:
        if name in _CALIBRATORS:
            raise ValueError(f"calibrator {name!r} is already registered")
        cls.name = name
        _CALIBRATORS[name] = cls
        return cls

    return decorate


def list_calibrators() -> list[str]:
    return sorted(_CALIBRATORS)


def get_calibrator(name: str, **kwargs: object) -> Calibrator:
    """Instantiate a registered calibrator; kwargs are its config fields."""
    if name not in _CALIBRATORS:
        raise ValueError(f"unknown calibrator {name!r}; known: {', '.join(list_calibrators())}")
    return _CALIBRATORS[name](**kwargs)


# ------------------------------------------------------------------ helpers
def _prepare(
    memory: GaussianMemory,
    old_features: torch.Tensor,
    new_features: torch.Tensor,
    new_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate inputs and return (A, D) as float64 CPU tensors."""
    if old_features.ndim != 2 or old_features.shape != new_features.shape:
        raise ValueError(
            "old_features and new_features must both be [n, d] with the same shape, got "
            f"{tuple(old_features.shape)} and {tuple(new_features.shape)}"
        )
    if old_features.shape[0] < 2:
        raise ValueError("calibration needs at least 2 new-task feature vectors")
    if memory.dim is not None and old_features.shape[1] != memory.dim:
        raise ValueError(
            f"features have dimension {old_features.shape[1]}, memory has {memory.dim}"
        )
    if new_labels is not None and tuple(new_labels.shape) != (old_features.shape[0],):
        raise ValueError(
            f"new_labels must have shape ({old_features.shape[0]},), got {tuple(new_labels.shape)}"
        )
    a = old_features.detach().to("cpu", torch.float64)
    b = new_features.detach().to("cpu", torch.float64)
    return a, b - a


def _scaled_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared distance between L2-normalised rows, divided by its max (so max is 1)."""
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    cost = (2.0 - 2.0 * xn @ yn.T).clamp_min(0.0)
    top = cost.max()
    return cost / top if top > 0 else cost


def _row_normalised_plan(
    cost: torch.Tensor, reg: float, num_iter_max: int, stop_threshold: float
) -> tuple[torch.Tensor, float]:
    """Entropic plan with uniform marginals, rows rescaled to sum to 1; and its marginal error.

    POT's non-convergence warning is silenced: the plan is only used row-normalised, and
    the marginal error in the report says how far from converged it was.
    """
    k, n = cost.shape
    a = torch.full((k,), 1.0 / k, dtype=torch.float64)
    b = torch.full((n,), 1.0 / n, dtype=torch.float64)
    # POT's numpy backend is markedly faster than its torch backend on CPU.
    plan = torch.from_numpy(
        ot.sinkhorn(
            a.numpy(),
            b.numpy(),
            cost.numpy(),
            reg=reg,
            method="sinkhorn_log",
            numItermax=num_iter_max,
            stopThr=stop_threshold,
            warn=False,
        )
    )
    rows, cols = plan.sum(dim=1), plan.sum(dim=0)
    error = max(float((rows - a).abs().sum()), float((cols - b).abs().sum()))
    return plan / rows.clamp_min(torch.finfo(torch.float64).tiny)[:, None], error


def _sample_covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(dim=0)
    return centred.T @ centred / (x.shape[0] - 1)


def _nearest_psd(cov: torch.Tensor, min_eigenvalue: float) -> torch.Tensor:
    """Symmetrise and clip eigenvalues from below, so Cholesky sampling keeps working."""
    sym = 0.5 * (cov + cov.T)
    vals, vecs = torch.linalg.eigh(sym)
    if bool((vals >= min_eigenvalue).all()):
        return sym
    out = (vecs * vals.clamp_min(min_eigenvalue)) @ vecs.T
    return 0.5 * (out + out.T)


def _apply(
    method: str,
    memory: GaussianMemory,
    new_means: dict[int, torch.Tensor],
    new_covs: dict[int, torch.Tensor] | None = None,
    marginal_error: float | None = None,
) -> CalibrationReport:
    """Write the calibrated statistics into the memory and report the shifts."""
    indices = list(new_means)
    mean_shift, cov_shift = [], []
    for c in indices:
        cov = None if new_covs is None else new_covs[c]
        mean_shift.append(torch.linalg.vector_norm(new_means[c] - memory.mean(c)))
        delta = 0.0 if cov is None else torch.linalg.matrix_norm(cov - memory.covariance(c))
        cov_shift.append(torch.as_tensor(delta, dtype=torch.float64))
        memory.update(c, mean=new_means[c], covariance=cov)
    empty = torch.zeros(0, dtype=torch.float64)
    return CalibrationReport(
        method=method,
        class_indices=indices,
        mean_shift=torch.stack(mean_shift) if indices else empty,
        covariance_shift=torch.stack(cov_shift) if indices else empty,
        marginal_error=marginal_error,
    )


# -------------------------------------------------------------- calibrators
@register_calibrator("sinkhorn")
@dataclass
class SinkhornCalibrator(Calibrator):
    """Sample-level plan between memory samples and A; samples move by plan-weighted D."""

    samples_per_class: int = 128
    reg: float = 0.05
    num_iter_max: int = 1000
    stop_threshold: float = 1e-9
    min_eigenvalue: float = 1e-10

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        a, drift = _prepare(memory, old_features, new_features, new_labels)
        classes = memory.class_indices
        if not classes:
            return _apply(self.name, memory, {})
        m = self.samples_per_class
        if m < 2:
            raise ValueError("samples_per_class must be >= 2 to move covariances")
        samples = torch.cat([memory.sample(c, m, generator) for c in classes])
        plan, error = _row_normalised_plan(
            _scaled_cost(samples, a), self.reg, self.num_iter_max, self.stop_threshold
        )
        moves = plan @ drift
        new_means: dict[int, torch.Tensor] = {}
        new_covs: dict[int, torch.Tensor] = {}
        for i, c in enumerate(classes):
            x, dx = samples[i * m : (i + 1) * m], moves[i * m : (i + 1) * m]
            new_means[c] = memory.mean(c) + dx.mean(dim=0)
            # Same samples before and after: the sampling noise cancels in the difference.
            delta = _sample_covariance(x + dx) - _sample_covariance(x)
            new_covs[c] = _nearest_psd(memory.covariance(c) + delta, self.min_eigenvalue)
        return _apply(self.name, memory, new_means, new_covs, error)


@register_calibrator("bures")
@dataclass
class BuresCalibrator(Calibrator):
    """Closed-form Gaussian (Bures-Wasserstein) map fitted from N(A) to N(B)."""

    ridge: float = 1e-6

    def fit(
        self, old_features: torch.Tensor, new_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (T [d, d], t [d]) with x -> x @ T + t; biased covariances, as POT does."""
        a = old_features.detach().to("cpu", torch.float64)
        b = new_features.detach().to("cpu", torch.float64)
        eye = torch.eye(a.shape[1], dtype=torch.float64)
        ms, mt = a.mean(dim=0), b.mean(dim=0)
        cs = (a - ms).T @ (a - ms) / a.shape[0] + self.ridge * eye
        ct = (b - mt).T @ (b - mt) / b.shape[0] + self.ridge * eye
        transform, bias = ot.gaussian.bures_wasserstein_mapping(ms, mt, cs, ct)
        return transform, bias.reshape(-1)

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        _prepare(memory, old_features, new_features, new_labels)
        classes = memory.class_indices
        if not classes:
            return _apply(self.name, memory, {})
        transform, bias = self.fit(old_features, new_features)
        new_means = {c: memory.mean(c) @ transform + bias for c in classes}
        new_covs = {c: transform.T @ memory.covariance(c) @ transform for c in classes}
        return _apply(self.name, memory, new_means, new_covs)


@register_calibrator("class_level")
@dataclass
class ClassLevelCalibrator(Calibrator):
    """COIL-style plan between old-class means and new-class means of A; means only."""

    reg: float = 0.05
    num_iter_max: int = 1000
    stop_threshold: float = 1e-9

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        a, drift = _prepare(memory, old_features, new_features, new_labels)
        classes = memory.class_indices
        if not classes:
            return _apply(self.name, memory, {})
        labels = new_labels.detach().to("cpu")
        groups = [labels == y for y in torch.unique(labels)]
        new_class_means = torch.stack([a[g].mean(dim=0) for g in groups])
        new_class_drift = torch.stack([drift[g].mean(dim=0) for g in groups])
        old_means = torch.stack([memory.mean(c) for c in classes])
        plan, error = _row_normalised_plan(
            _scaled_cost(old_means, new_class_means),
            self.reg,
            self.num_iter_max,
            self.stop_threshold,
        )
        moved = old_means + plan @ new_class_drift
        moved_means = {c: moved[i] for i, c in enumerate(classes)}
        return _apply(self.name, memory, moved_means, marginal_error=error)


@register_calibrator("none")
@dataclass
class NoCalibration(Calibrator):
    """Moves nothing: DMC-OT without its calibration (an ablation; task tokens only)."""

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        n = len(memory)
        zeros = torch.zeros(n, dtype=torch.float64)
        return CalibrationReport(self.name, memory.class_indices, zeros, zeros.clone(), None)


# ---------------------------------------------------------------- diagnostic
def mean_alignment(calibrated_means: torch.Tensor, true_means: torch.Tensor) -> torch.Tensor:
    """Cosine [C] between each calibrated class mean and its true mean under the new encoder."""
    if calibrated_means.shape != true_means.shape or calibrated_means.ndim != 2:
        raise ValueError(
            "calibrated_means and true_means must both be [C, d], got "
            f"{tuple(calibrated_means.shape)} and {tuple(true_means.shape)}"
        )
    x = calibrated_means.detach().to("cpu", torch.float64)
    y = true_means.detach().to("cpu", torch.float64)
    return F.cosine_similarity(x, y, dim=1)
