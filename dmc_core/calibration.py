"""Optimal-transport calibration of the Gaussian memory (DMC-OT, part (a)).

When stage 1 changes the image encoder, the stored statistics of old classes were
measured with the old encoder. The new task's images X are embedded by both encoders
(A = f_old(X), B = f_new(X), drift D = B - A) and the old statistics are moved along D.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import ot
import torch
import torch.nn.functional as F

from dmc_core.memory import GaussianMemory, MemoryConfig, shrink_covariance
from dmc_core.sinkhorn import sinkhorn_log_blocks

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
MIB = 2**20
F64 = torch.float64


def _prepare(
    memory: GaussianMemory,
    old_features: torch.Tensor,
    new_features: torch.Tensor,
    new_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate inputs and return (A, D) in float64 on the device of the features."""
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
    a = old_features.detach().to(F64)
    b = new_features.detach().to(device=a.device, dtype=F64)
    return a, b - a


def _unit_cost(x: torch.Tensor, y_normalised: torch.Tensor) -> torch.Tensor:
    """Squared distance between L2-normalised rows of x and (normalised) rows of y."""
    return (2.0 - 2.0 * F.normalize(x, dim=1) @ y_normalised.T).clamp_min(0.0)


def _sample_covariance(x: torch.Tensor) -> torch.Tensor:
    """Covariances [k, d, d] of batches of samples [k, m, d]."""
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred.transpose(-1, -2) @ centred / (x.shape[-2] - 1)


def _nearest_psd(cov: torch.Tensor, min_eigenvalue: float) -> torch.Tensor:
    """Symmetrise [.., d, d] and clip eigenvalues from below at min_eigenvalue.

    Batched; the eigendecomposition runs only for the matrices whose smallest eigenvalue
    is below the floor (a Cholesky of cov - floor*I fails for exactly those).
    """
    sym = 0.5 * (cov + cov.transpose(-1, -2))
    batch = sym.reshape(-1, *sym.shape[-2:])
    eye = torch.eye(sym.shape[-1], dtype=sym.dtype, device=sym.device)
    _, info = torch.linalg.cholesky_ex(batch - min_eigenvalue * eye)
    bad = (info != 0).nonzero().flatten()
    if bad.numel() == 0:
        return sym
    vals, vecs = torch.linalg.eigh(batch[bad])
    fixed = (vecs * vals.clamp_min(min_eigenvalue)[..., None, :]) @ vecs.transpose(-1, -2)
    out = batch.clone()
    out[bad] = 0.5 * (fixed + fixed.transpose(-1, -2))
    return out.reshape(sym.shape)


def _linear_map_covariance(
    cov: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, ridge: float
) -> torch.Tensor:
    """A^T cov A with A = I + J, J the ridge regression of the moves dx [k, m, d] on the
    centred samples x (kernel form, m x m solves): a linear fit of the local drift, so the
    result is positive semi-definite and carries no sample-covariance noise."""
    xc = x - x.mean(dim=-2, keepdim=True)
    dc = dx - dx.mean(dim=-2, keepdim=True)
    gram = xc @ xc.transpose(-1, -2)  # [k, m, m]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(dim=-1)
    eye_m = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    jac = xc.transpose(-1, -2) @ torch.linalg.solve(gram + ridge * scale[:, None, None] * eye_m, dc)
    a = jac + torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return a.transpose(-1, -2) @ cov @ a


def _row_normalised_plan(
    cost: torch.Tensor, reg: float, num_iter_max: int, stop_threshold: float
) -> tuple[torch.Tensor, float]:
    """Dense entropic plan with uniform marginals, rows rescaled to sum to 1; and its
    L1 marginal error. For small problems (class-level plans)."""
    pot = sinkhorn_log_blocks(
        lambda _: cost, [cost.shape[0]], cost.shape[1], reg, num_iter_max, stop_threshold
    )
    log_plan = -cost / reg + pot.u[:, None] + pot.v[None, :]
    plan = torch.exp(log_plan)
    k, n = cost.shape
    error = max(
        float((plan.sum(dim=1) - 1.0 / k).abs().sum()),
        float((plan.sum(dim=0) - 1.0 / n).abs().sum()),
    )
    return torch.softmax(log_plan, dim=1), error


def _report(
    method: str,
    classes: list[int],
    mean_shift: list[torch.Tensor],
    cov_shift: list[torch.Tensor],
    marginal_error: float | None,
) -> CalibrationReport:
    empty = torch.zeros(0, dtype=F64)
    return CalibrationReport(
        method=method,
        class_indices=classes,
        mean_shift=torch.cat(mean_shift).cpu() if mean_shift else empty,
        covariance_shift=torch.cat(cov_shift).cpu() if cov_shift else empty,
        marginal_error=marginal_error,
    )


def _apply_block(
    memory: GaussianMemory,
    classes: list[int],
    new_means: torch.Tensor,
    new_covs: torch.Tensor | None,
    old_covs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write calibrated statistics of some classes; return (mean shift, covariance shift)."""
    old_means = torch.stack([memory.mean(c) for c in classes]).to(new_means.device)
    mean_shift = torch.linalg.vector_norm(new_means - old_means, dim=1)
    if new_covs is None:
        cov_shift = torch.zeros_like(mean_shift)
    else:
        if old_covs is None:
            old_covs = memory.covariances(classes, device=new_covs.device)
        cov_shift = torch.linalg.matrix_norm(new_covs - old_covs)
    memory.update_many(classes, means=new_means, covariances=new_covs)
    return mean_shift, cov_shift


def _class_blocks(n_classes: int, per_block: int) -> list[range]:
    return [range(s, min(s + per_block, n_classes)) for s in range(0, n_classes, per_block)]


# -------------------------------------------------------------- calibrators
@register_calibrator("sinkhorn")
@dataclass
class SinkhornCalibrator(Calibrator):
    """Sample-level plan between memory samples and A; samples move by plan-weighted D.

    The K x n plan is solved in blocks of classes within `memory_budget_mib` of working
    memory (float64, on the device of the features): costs and samples are cached when
    they fit, else recomputed each iteration from per-class generators, so the result
    does not depend on the budget. Covariances move by `covariance_update`:
    "linear_map" (A^T cov A with A = I + a ridge fit of dx on x), "sample_difference"
    (METHOD.md: cov(x + dx) - cov(x) of the same samples) or "none".

    Why not METHOD's rule by default: with m = 128 samples in d = 384 the sample
    covariance C_m is far from cov, and cov + (A^T C_m A - C_m) differs from A^T cov A
    by A^T (cov - C_m) A - (cov - C_m), which leaks variance of large directions into
    small ones and drives some eigenvalues below zero; floored, they make the stored
    covariances useless for a Mahalanobis score (bench/memory_classifier.py: 20% vs 78%).
    """

    samples_per_class: int = 128
    reg: float = 0.05
    num_iter_max: int = 1000
    stop_threshold: float = 1e-9
    memory_budget_mib: float = 256.0
    covariance_update: Literal["sample_difference", "linear_map", "none"] = "linear_map"
    map_ridge: float = 0.1
    # Eigenvalue floor of the moved covariances; None: the memory's eps (the former 1e-10
    # floor made nearly singular covariances, useless for a Mahalanobis score).
    min_eigenvalue: float | None = None

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
            return _report(self.name, [], [], [], None)
        m = self.samples_per_class
        if m < 2:
            raise ValueError("samples_per_class must be >= 2 to move covariances")
        if self.covariance_update not in ("sample_difference", "linear_map", "none"):
            raise ValueError(f"unknown covariance_update {self.covariance_update!r}")
        device, (n, d) = a.device, a.shape
        a_unit = F.normalize(a, dim=1)
        seeds = torch.randint(
            2**62, (len(classes),), generator=generator, device=generator.device
        ).tolist()
        blocks, kept_costs, keep_samples = self._layout(len(classes), n, d)
        sample_cache: dict[int, torch.Tensor] = {}
        cost_cache: dict[int, torch.Tensor] = {}

        def samples(b: int) -> torch.Tensor:
            if b in sample_cache:
                return sample_cache[b]
            block = blocks[b]
            gens = [torch.Generator(device=device).manual_seed(seeds[i]) for i in block]
            x, _ = memory.sample_classes([classes[i] for i in block], m, gens, device)
            if keep_samples:
                sample_cache[b] = x
            return x

        def raw_cost(b: int) -> torch.Tensor:
            if b in cost_cache:
                return cost_cache[b]
            cost = _unit_cost(samples(b).to(F64), a_unit)
            if b < kept_costs:
                cost_cache[b] = cost
            return cost

        top = max(float(raw_cost(b).max()) for b in range(len(blocks)))
        scale = 1.0 / top if top > 0 else 1.0
        pot = sinkhorn_log_blocks(
            lambda b: raw_cost(b) * scale,
            [len(block) * m for block in blocks],
            n,
            self.reg,
            self.num_iter_max,
            self.stop_threshold,
        )
        # Final pass: row-normalised plan, moves, and the statistics of each block.
        column_lse = torch.full((n,), -math.inf, dtype=F64, device=device)
        row_error = 0.0
        mean_shifts, cov_shifts, offset = [], [], 0
        for b, block in enumerate(blocks):
            scaled = raw_cost(b) * (-scale / self.reg)
            rows = slice(offset, offset + len(block) * m)
            offset += len(block) * m
            logits = scaled + pot.v
            row_lse = torch.logsumexp(logits, dim=1)
            moves = torch.softmax(logits, dim=1) @ drift
            row_error += float(
                (torch.exp(pot.u[rows] + row_lse) - 1.0 / (len(classes) * m)).abs().sum()
            )
            column_lse = torch.logaddexp(
                column_lse, torch.logsumexp(scaled + pot.u[rows, None], dim=0)
            )
            block_classes = [classes[i] for i in block]
            x = samples(b).to(F64).reshape(len(block), m, d)
            dx = moves.reshape(len(block), m, d)
            means = torch.stack([memory.mean(c) for c in block_classes]).to(device)
            new_covs = old_covs = None
            if self.covariance_update != "none":
                old_covs = memory.covariances(block_classes, device=device)
                if self.covariance_update == "linear_map":
                    moved = _linear_map_covariance(old_covs, x, dx, self.map_ridge)
                else:
                    moved = old_covs + _sample_covariance(x + dx) - _sample_covariance(x)
                floor = self.min_eigenvalue
                new_covs = _nearest_psd(moved, memory.config.eps if floor is None else floor)
            shift = _apply_block(memory, block_classes, means + dx.mean(dim=1), new_covs, old_covs)
            mean_shifts.append(shift[0])
            cov_shifts.append(shift[1])
        column_error = float((torch.exp(column_lse + pot.v) - 1.0 / n).abs().sum())
        return _report(self.name, classes, mean_shifts, cov_shifts, max(row_error, column_error))

    def _layout(self, n_classes: int, n: int, d: int) -> tuple[list[range], int, bool]:
        """Blocks of classes, how many of the blocks keep their cost, and whether the
        samples are kept, within the budget.

        Counted in float64 words: fixed, A, D and the potentials; per class of the block
        being worked on, its cost rows with the temporaries of a logsumexp (6 n m), samples
        and moves (4 d m), covariances and their temporaries (12 d^2); per class kept,
        its samples (float32, d m / 2) and its cost rows (n m). What is not kept is
        recomputed at each iteration: the samples first, being the cheaper to keep.
        """
        m = self.samples_per_class
        budget = self.memory_budget_mib * MIB / 8
        fixed = 3 * n * d + 2 * (n_classes * m + n)
        per_class = 6 * n * m + 4 * d * m + 12 * d * d
        cost_words, sample_words = n * m, d * m / 2
        free = budget - fixed
        if n_classes * (per_class + cost_words + sample_words) <= free:
            return _class_blocks(n_classes, n_classes), 1, True
        per_block = max(1, int(free / 2 // per_class))
        blocks = _class_blocks(n_classes, per_block)
        free -= per_block * per_class
        keep_samples = n_classes * sample_words <= free
        if keep_samples:
            free -= n_classes * sample_words
        kept_costs = max(0, int(free // (per_block * cost_words)))
        return blocks, min(kept_costs, len(blocks)), keep_samples


@register_calibrator("bures")
@dataclass
class BuresCalibrator(Calibrator):
    """Closed-form Gaussian (Bures-Wasserstein) map fitted from N(A) to N(B).

    The covariances of A and B have rank at most n - 1, so they are regularised before
    the map is fitted: "memory" shrinks them like the memory's class covariances
    (well-posed when n <= d), "ridge" adds `ridge` times their mean eigenvalue.
    """

    regularisation: Literal["memory", "ridge"] = "memory"
    ridge: float = 1e-6
    memory_budget_mib: float = 256.0

    def fit(
        self,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        memory_config: MemoryConfig | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (T [d, d], t [d]) with x -> x @ T + t."""
        a = old_features.detach().to(F64)
        b = new_features.detach().to(device=a.device, dtype=F64)
        ms, mt = a.mean(dim=0), b.mean(dim=0)
        if self.regularisation == "memory":
            config = memory_config if memory_config is not None else MemoryConfig()
            cs, ct = shrink_covariance(a, config), shrink_covariance(b, config)
        elif self.regularisation == "ridge":
            cs, ct = (
                self._ridged((x - mu).T @ (x - mu) / x.shape[0]) for x, mu in ((a, ms), (b, mt))
            )
        else:
            raise ValueError(f"unknown regularisation {self.regularisation!r}")
        transform, bias = ot.gaussian.bures_wasserstein_mapping(ms, mt, cs, ct)
        return transform, bias.reshape(-1)

    def _ridged(self, cov: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        return cov + self.ridge * torch.diagonal(cov).mean().clamp_min(1e-12) * eye

    def calibrate(
        self,
        memory: GaussianMemory,
        old_features: torch.Tensor,
        new_features: torch.Tensor,
        new_labels: torch.Tensor,
        generator: torch.Generator,
    ) -> CalibrationReport:
        a, _ = _prepare(memory, old_features, new_features, new_labels)
        classes = memory.class_indices
        if not classes:
            return _report(self.name, [], [], [], None)
        transform, bias = self.fit(old_features, new_features, memory.config)
        d = a.shape[1]
        per_block = max(1, int(self.memory_budget_mib * MIB / (8 * 4 * d * d)))
        mean_shifts, cov_shifts = [], []
        for block in _class_blocks(len(classes), per_block):
            block_classes = [classes[i] for i in block]
            means = torch.stack([memory.mean(c) for c in block_classes]).to(a.device)
            old_covs = memory.covariances(block_classes, device=a.device)
            new_covs = _nearest_psd(transform.T @ old_covs @ transform, memory.config.eps)
            shift = _apply_block(
                memory, block_classes, means @ transform + bias, new_covs, old_covs
            )
            mean_shifts.append(shift[0])
            cov_shifts.append(shift[1])
        return _report(self.name, classes, mean_shifts, cov_shifts, None)


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
            return _report(self.name, [], [], [], None)
        labels = new_labels.detach().to(a.device)
        groups = [labels == y for y in torch.unique(labels)]
        new_class_means = torch.stack([a[g].mean(dim=0) for g in groups])
        new_class_drift = torch.stack([drift[g].mean(dim=0) for g in groups])
        old_means = torch.stack([memory.mean(c) for c in classes]).to(a.device)
        cost = _unit_cost(old_means, F.normalize(new_class_means, dim=1))
        top = cost.max()
        plan, error = _row_normalised_plan(
            cost / top if top > 0 else cost, self.reg, self.num_iter_max, self.stop_threshold
        )
        shift = _apply_block(memory, classes, old_means + plan @ new_class_drift, None)
        return _report(self.name, classes, [shift[0]], [shift[1]], error)


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
