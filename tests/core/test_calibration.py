"""Tests for OT calibration of the Gaussian memory, on data with a known drift."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ot
import pytest
import torch

from dmc_core.calibration import (
    BuresCalibrator,
    CalibrationReport,
    Calibrator,
    SinkhornCalibrator,
    _linear_map_covariance,
    _nearest_psd,
    _sample_covariance,
    get_calibrator,
    list_calibrators,
    mean_alignment,
    register_calibrator,
)
from dmc_core.memory import GaussianMemory, MemoryConfig
from dmc_core.sinkhorn import sinkhorn_log_blocks

Encoder = Callable[[torch.Tensor], torch.Tensor]

# Small enough for two CPU cores; the defaults (m=128, 1000 iterations) only cost time.
FAST_SINKHORN: dict[str, Any] = {"samples_per_class": 64, "num_iter_max": 300}


@dataclass
class DriftProblem:
    old_classes: list[torch.Tensor]  # old-encoder features of each old class
    new_x: torch.Tensor  # old-encoder features of the new task's images (A)
    new_y: torch.Tensor
    new_encoder: Encoder  # old-encoder view -> new-encoder view

    def memory(self) -> GaussianMemory:
        memory = GaussianMemory()
        for c, x in enumerate(self.old_classes):
            memory.add_class(c, x)
        return memory

    def true_means(self) -> torch.Tensor:
        return torch.stack([self.new_encoder(x).mean(dim=0) for x in self.old_classes])


def _drift_problem(
    encoder: Callable[[torch.Generator, int], Encoder],
    d: int = 16,
    n_old: int = 4,
    per_class: int = 40,
    seed: int = 0,
) -> DriftProblem:
    """Old classes, plus a new task of 2 other classes near each old one (same region)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    centres = 1.5 * torch.randn(n_old, d, generator=g, dtype=f64)
    old = [c + 0.4 * torch.randn(per_class, d, generator=g, dtype=f64) for c in centres]
    new_centres = centres.repeat_interleave(2, dim=0)
    new_centres = new_centres + 0.5 * torch.randn(2 * n_old, d, generator=g, dtype=f64)
    new_x = torch.cat(
        [c + 0.4 * torch.randn(per_class, d, generator=g, dtype=f64) for c in new_centres]
    )
    new_y = torch.arange(100, 100 + 2 * n_old).repeat_interleave(per_class)
    return DriftProblem(old, new_x, new_y, encoder(g, d))


def _nonlinear(g: torch.Generator, d: int) -> Encoder:
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / (1.5 * d**0.5)
    shift = 0.3 * torch.randn(d, generator=g, dtype=torch.float64)
    return lambda x: x + 0.5 * torch.tanh(x @ w) + shift


def _affine(g: torch.Generator, d: int) -> Encoder:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    spd = q @ torch.diag(torch.linspace(0.7, 1.4, d, dtype=torch.float64)) @ q.T
    shift = torch.randn(d, generator=g, dtype=torch.float64)
    return lambda x: x @ spd + shift


def _calibrate(
    problem: DriftProblem, calibrator: Calibrator, seed: int = 0
) -> tuple[GaussianMemory, torch.Tensor, CalibrationReport]:
    memory = problem.memory()
    a, b = problem.new_x, problem.new_encoder(problem.new_x)
    report = calibrator.calibrate(memory, a, b, problem.new_y, torch.Generator().manual_seed(seed))
    assert report.class_indices == memory.class_indices
    return memory, torch.stack([memory.mean(c) for c in memory.class_indices]), report


@pytest.mark.parametrize(("name", "kwargs"), [("sinkhorn", FAST_SINKHORN), ("class_level", {})])
def test_nonlinear_drift_is_mostly_corrected(name: str, kwargs: dict[str, int]) -> None:
    problem = _drift_problem(_nonlinear)
    before = torch.stack([m.mean(dim=0) for m in problem.old_classes])
    true = problem.true_means()
    _, after, report = _calibrate(problem, get_calibrator(name, **kwargs))
    # the naive alternative: move every class by the average drift of the new task
    drift = problem.new_encoder(problem.new_x) - problem.new_x
    global_shift = before + drift.mean(dim=0)

    err_before = (before - true).norm(dim=1).mean()
    err_after = (after - true).norm(dim=1).mean()
    err_global = (global_shift - true).norm(dim=1).mean()
    ratio, ratio_global = float(err_after / err_before), float(err_after / err_global)
    cos_before = mean_alignment(before, true).mean()
    cos_after = mean_alignment(after, true).mean()
    print(
        f"\n{name}: error ratio calibrated/uncalibrated={ratio:.3f}, "
        f"calibrated/global-shift={ratio_global:.4f}, "
        f"mean cosine {cos_before:.4f} -> {cos_after:.4f}"
    )
    assert ratio < 0.5
    assert ratio_global < 0.6  # the plan localises the drift, it is not just the average
    assert cos_after > cos_before
    assert report.marginal_error is not None and report.marginal_error < 1e-2


def test_sinkhorn_keeps_covariances_symmetric_positive_definite() -> None:
    problem = _drift_problem(_nonlinear)
    memory, _, _ = _calibrate(problem, get_calibrator("sinkhorn", **FAST_SINKHORN))
    for c in memory.class_indices:
        cov = memory.covariance(c)
        assert torch.equal(cov, cov.T)
        assert torch.linalg.eigvalsh(cov).min() > 0
        assert int(torch.linalg.cholesky_ex(cov).info) == 0


@pytest.mark.parametrize(
    ("name", "kwargs"), [("sinkhorn", FAST_SINKHORN), ("class_level", {}), ("bures", {})]
)
def test_constant_drift_moves_means_exactly_and_keeps_covariances(
    name: str, kwargs: dict[str, int]
) -> None:
    shift = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64)
    problem = _drift_problem(lambda g, d: lambda x: x + shift)
    memory = problem.memory()
    covs = [memory.covariance(c) for c in memory.class_indices]
    a = problem.new_x
    report = get_calibrator(name, **kwargs).calibrate(
        memory, a, a + shift, problem.new_y, torch.Generator().manual_seed(0)
    )
    for c, x in enumerate(problem.old_classes):
        # statistics are stored in float32: exact up to its rounding
        torch.testing.assert_close(memory.mean(c), x.mean(dim=0) + shift, rtol=1e-6, atol=1e-6)
        # for sinkhorn: the same samples before and after, so no sampling noise is added
        torch.testing.assert_close(memory.covariance(c), covs[c], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        report.mean_shift, shift.norm().expand(len(covs)), rtol=1e-6, atol=1e-6
    )


def test_bures_is_exact_on_affine_drift_and_agrees_with_pot() -> None:
    problem = _drift_problem(_affine)
    covs_before = [problem.memory().covariance(c) for c in range(len(problem.old_classes))]
    memory, after, report = _calibrate(problem, BuresCalibrator("ridge", ridge=1e-6))
    assert report.marginal_error is None  # closed form: no plan
    exact_means = torch.stack([problem.new_encoder(x).mean(dim=0) for x in problem.old_classes])
    torch.testing.assert_close(after, exact_means, rtol=0, atol=1e-5)
    eye = torch.eye(16, dtype=torch.float64)
    linear = problem.new_encoder(eye) - problem.new_encoder(torch.zeros(1, 16, dtype=eye.dtype))
    for c, cov in enumerate(covs_before):
        exact_cov = linear.T @ cov @ linear
        torch.testing.assert_close(memory.covariance(c), exact_cov, rtol=1e-5, atol=1e-5)

    new_view = problem.new_encoder(problem.new_x).numpy()
    pot = ot.da.LinearTransport(reg=1e-6).fit(Xs=problem.new_x.numpy(), Xt=new_view)
    before = torch.stack([x.mean(dim=0) for x in problem.old_classes]).numpy()
    expected = torch.from_numpy(pot.transform(Xs=before))
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)


def test_same_generator_gives_same_result() -> None:
    problem = _drift_problem(_nonlinear)
    calibrator = SinkhornCalibrator(**FAST_SINKHORN)
    mem1, means1, _ = _calibrate(problem, calibrator, seed=3)
    mem2, means2, _ = _calibrate(problem, calibrator, seed=3)
    _, means3, _ = _calibrate(problem, calibrator, seed=4)
    assert torch.equal(means1, means2)
    assert all(torch.equal(mem1.covariance(c), mem2.covariance(c)) for c in mem1.class_indices)
    assert not torch.equal(means1, means3)  # the generator really drives the samples


def test_registry() -> None:
    assert {"sinkhorn", "bures", "class_level"} <= set(list_calibrators())
    calibrator = get_calibrator("sinkhorn", samples_per_class=8, reg=0.1)
    assert isinstance(calibrator, SinkhornCalibrator)
    assert (calibrator.samples_per_class, calibrator.reg) == (8, 0.1)
    assert get_calibrator("sinkhorn") == SinkhornCalibrator(samples_per_class=128, reg=0.05)
    with pytest.raises(
        ValueError, match=r"unknown calibrator 'nope'.*bures.*class_level.*sinkhorn"
    ):
        get_calibrator("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_calibrator("bures")(BuresCalibrator)


def test_empty_memory_and_bad_inputs() -> None:
    a = torch.randn(10, 4, dtype=torch.float64)
    labels = torch.zeros(10, dtype=torch.long)
    report = get_calibrator("sinkhorn").calibrate(
        GaussianMemory(), a, a + 1, labels, torch.Generator()
    )
    assert report.class_indices == [] and report.mean_shift.numel() == 0

    memory = GaussianMemory()
    memory.add_class(0, torch.randn(5, 4))
    with pytest.raises(ValueError, match="same shape"):
        get_calibrator("bures").calibrate(memory, a, a[:5], labels, torch.Generator())
    with pytest.raises(ValueError, match="memory has 4"):
        get_calibrator("bures").calibrate(
            memory, torch.randn(10, 3), torch.randn(10, 3), labels, torch.Generator()
        )
    with pytest.raises(ValueError, match="new_labels"):
        get_calibrator("class_level").calibrate(memory, a, a, labels[:3], torch.Generator())


def test_nearest_psd_clips_negative_eigenvalues() -> None:
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    vals = torch.tensor([2.0, 1.0, 0.5, -1e-3, -0.2], dtype=torch.float64)
    fixed = _nearest_psd(q @ torch.diag(vals) @ q.T, 1e-8)
    assert torch.equal(fixed, fixed.T)
    got = torch.linalg.eigvalsh(fixed)
    torch.testing.assert_close(got[2:], torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    assert got[:2].min() > 0 and got[:2].max() < 1e-6


def test_mean_alignment_is_per_class_cosine() -> None:
    calibrated = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    true = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    cos = mean_alignment(calibrated, true)
    torch.testing.assert_close(cos, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[C, d\]"):
        mean_alignment(calibrated, true[:2])


# ------------------------------------------------------------ budget and edges
def test_blocked_sinkhorn_is_pots_sinkhorn_log() -> None:
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(37, 23, generator=g, dtype=torch.float64)
    blocks = [cost[:10], cost[10:11], cost[11:]]
    pot = sinkhorn_log_blocks(lambda b: blocks[b], [10, 1, 26], 23, 0.05, 200, 1e-12)
    ours = torch.exp(-cost / 0.05 + pot.u[:, None] + pot.v[None, :])
    a, b = torch.full((37,), 1 / 37, dtype=torch.float64), torch.full((23,), 1 / 23)
    reference = ot.sinkhorn(
        a.numpy(), b.double().numpy(), cost.numpy(), 0.05, "sinkhorn_log", 200, 1e-12, warn=False
    )
    torch.testing.assert_close(ours, torch.from_numpy(reference), rtol=1e-9, atol=1e-15)
    assert pot.iterations < 200  # converged and stopped like POT


@pytest.mark.parametrize(
    ("update", "budget_mib"),
    [("sample_difference", 0.1), ("linear_map", 0.1), ("sample_difference", 0.75)],
)
def test_sinkhorn_within_a_tiny_budget_equals_the_dense_solve(
    update: str, budget_mib: float
) -> None:
    problem = _drift_problem(_nonlinear, n_old=5, per_class=20)
    kwargs = {"samples_per_class": 32, "num_iter_max": 100, "covariance_update": update}
    dense_calibrator = SinkhornCalibrator(**kwargs)  # type: ignore[arg-type]
    tiny = SinkhornCalibrator(**kwargs, memory_budget_mib=budget_mib)  # type: ignore[arg-type]
    n, d = problem.new_x.shape
    # the dense plan would not fit: several blocks; at 0.1 MiB costs and samples are
    # recomputed every iteration, at 0.75 MiB they are kept
    blocks, kept_costs, keep_samples = tiny._layout(5, n, d)
    assert len(blocks) > 1
    assert (kept_costs > 0 and keep_samples) if budget_mib > 0.5 else (kept_costs == 0)
    assert 5 * 32 * n * 8 > 0.1 * 2**20  # the dense K x n float64 plan alone
    dense_blocks, *_ = dense_calibrator._layout(5, n, d)
    assert len(dense_blocks) == 1
    dense, dense_means, dense_report = _calibrate(problem, dense_calibrator, seed=2)
    small, small_means, small_report = _calibrate(problem, tiny, seed=2)
    torch.testing.assert_close(small_means, dense_means, rtol=1e-6, atol=1e-6)
    for c in dense.class_indices:
        torch.testing.assert_close(small.covariance(c), dense.covariance(c), rtol=1e-5, atol=1e-6)
    assert small_report.marginal_error == pytest.approx(dense_report.marginal_error, abs=1e-9)


def test_linear_map_rule_is_exact_for_linear_moves() -> None:
    """Moves dx = (x - mean) J + t: the fitted map gives (I+J)^T cov (I+J) for the full
    covariance, while the sample-covariance difference carries the noise of m samples."""
    g = torch.Generator().manual_seed(0)
    k, m, d = 3, 64, 8
    root = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    cov = root @ root.transpose(1, 2) / d + 0.1 * torch.eye(d, dtype=torch.float64)
    x = torch.randn(k, m, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).mT
    jac = 0.3 * torch.randn(k, d, d, generator=g, dtype=torch.float64)
    dx = (x - x.mean(dim=1, keepdim=True)) @ jac + torch.randn(k, 1, d, generator=g).double()
    a = jac + torch.eye(d, dtype=torch.float64)
    exact = a.mT @ cov @ a
    fitted = _linear_map_covariance(cov, x, dx, ridge=1e-9)
    torch.testing.assert_close(fitted, exact, rtol=1e-5, atol=1e-6)
    difference = cov + _sample_covariance(x + dx) - _sample_covariance(x)
    relative = torch.linalg.matrix_norm(difference - exact) / torch.linalg.matrix_norm(exact)
    assert relative.min() > 0.05  # 64 samples: a visible error the fitted map does not have


def test_calibrated_covariances_are_floored_at_the_memory_eps() -> None:
    problem = _drift_problem(_nonlinear)
    memory = GaussianMemory(MemoryConfig(eps=1e-2, shrinkage="none"))
    for c, x in enumerate(problem.old_classes):
        memory.add_class(c, x[:6])  # rank 5 of 16: only eps keeps it definite
    a = problem.new_x
    calibrator = SinkhornCalibrator(**FAST_SINKHORN)
    # a strong contraction: the covariance difference removes variance
    calibrator.calibrate(memory, a, 0.2 * a, problem.new_y, torch.Generator().manual_seed(0))
    for c in memory.class_indices:
        assert torch.linalg.eigvalsh(memory.covariance(c)).min() > 1e-2 * (1 - 1e-4)


def test_bures_with_fewer_images_than_dimensions() -> None:
    problem = _drift_problem(_affine, per_class=40)
    few = slice(0, 10)  # 10 images, d = 16: covariances of A and B have rank 9
    a, b = problem.new_x[few], problem.new_encoder(problem.new_x[few])
    memory = problem.memory()
    before = torch.stack([memory.mean(c) for c in memory.class_indices])
    true = problem.true_means()
    BuresCalibrator().calibrate(memory, a, b, problem.new_y[few], torch.Generator())
    after = torch.stack([memory.mean(c) for c in memory.class_indices])
    assert torch.isfinite(after).all()
    for c in memory.class_indices:
        cov = memory.covariance(c)
        assert torch.isfinite(cov).all() and torch.linalg.eigvalsh(cov).min() > 0
    # regularised, the map still helps; a tiny ridge instead blows up the null directions
    assert (after - true).norm(dim=1).mean() < (before - true).norm(dim=1).mean()
    ridge = problem.memory()
    BuresCalibrator("ridge", ridge=1e-9).calibrate(
        ridge, a, b, problem.new_y[few], torch.Generator()
    )
    ridge_means = torch.stack([ridge.mean(c) for c in ridge.class_indices])
    assert (ridge_means - true).norm(dim=1).mean() > (after - true).norm(dim=1).mean()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sinkhorn_runs_on_the_device_of_the_features() -> None:
    problem = _drift_problem(_nonlinear)
    _, cpu_means, _ = _calibrate(problem, SinkhornCalibrator(**FAST_SINKHORN), seed=1)
    memory = problem.memory()
    a = problem.new_x.cuda()
    SinkhornCalibrator(**FAST_SINKHORN).calibrate(
        memory, a, problem.new_encoder(a), problem.new_y, torch.Generator().manual_seed(1)
    )
    means = torch.stack([memory.mean(c) for c in memory.class_indices])
    assert means.device.type == "cpu"  # the memory stays on the CPU
    # other random numbers on the GPU, the same calibration up to sampling noise
    assert (means - cpu_means).norm(dim=1).max() < 0.1 * (cpu_means.norm(dim=1).min())


def test_sample_difference_breaks_small_directions_and_the_linear_map_does_not() -> None:
    """The mechanism behind issue 20's 20% Mahalanobis: with fewer samples than
    dimensions, cov + cov(x + dx) - cov(x) under a drift that turns a large direction
    towards a small one goes negative; A^T cov A (fitted) stays positive definite."""
    d, m = 32, 16
    g = torch.Generator().manual_seed(0)
    cov = torch.diag(torch.logspace(1, -2, d, dtype=torch.float64))
    x = torch.randn(1, m, d, generator=g, dtype=torch.float64) @ cov.sqrt()
    turn = torch.eye(d, dtype=torch.float64)
    angle = torch.tensor(0.5, dtype=torch.float64)
    turn[0, 0], turn[0, -1], turn[-1, 0], turn[-1, -1] = (
        angle.cos(),
        angle.sin(),
        -angle.sin(),
        angle.cos(),
    )
    dx = (x - x.mean(dim=1, keepdim=True)) @ (turn - torch.eye(d, dtype=torch.float64))
    difference = cov + _sample_covariance(x + dx)[0] - _sample_covariance(x)[0]
    fitted = _linear_map_covariance(cov[None], x, dx, ridge=1e-6)[0]
    assert torch.linalg.eigvalsh(difference).min() < 0
    assert torch.linalg.eigvalsh(fitted).min() > 0
