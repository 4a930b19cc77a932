"""Tests for the per-class Gaussian memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmc_core.memory import GaussianMemory, MemoryConfig, ledoit_wolf_intensity, shrink_covariance


def _features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ mixing + 3.0 * torch.randn(d, generator=g)


def test_stats_match_numpy_when_enough_samples() -> None:
    n, d = 50, 8
    x = _features(n, d)
    memory = GaussianMemory(MemoryConfig(eps=1e-4, shrinkage="none"))
    memory.add_class(3, x)
    ref = x.double().numpy()
    expected_cov = np.cov(ref, rowvar=False) + 1e-4 * np.eye(d)
    assert memory.mean(3).dtype == torch.float64 and memory.covariance(3).dtype == torch.float64
    # stored in float32: equal up to its rounding
    np.testing.assert_allclose(memory.mean(3).numpy(), ref.mean(axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(memory.covariance(3).numpy(), expected_cov, rtol=1e-5, atol=1e-5)
    assert memory.dim == d and len(memory) == 1 and memory.class_indices == [3]
    assert memory.count(3) == n


def test_below_dim_shrinkage_applied_when_fewer_samples_than_dim() -> None:
    n, d, a1, a2, eps = 5, 12, 1.0, 0.5, 1e-4
    x = _features(n, d, seed=1)
    config = MemoryConfig(eps=eps, shrinkage="below_dim", shrink_alpha1=a1, shrink_alpha2=a2)
    memory = GaussianMemory(config)
    memory.add_class(0, x)

    cov = np.cov(x.double().numpy(), rowvar=False)
    off = ~np.eye(d, dtype=bool)
    expected = (
        cov
        + a1 * np.diag(cov).mean() * np.eye(d)
        + a2 * cov[off].mean() * (1.0 - np.eye(d))
        + eps * np.eye(d)
    )
    got = memory.covariance(0).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # rank-deficient sample covariance (rank <= n-1 < d) becomes well-conditioned
    assert np.linalg.matrix_rank(cov) < d
    assert np.linalg.eigvalsh(got).min() > 0.1 * np.diag(cov).mean()


def test_samples_reproduce_mean_and_covariance() -> None:
    d, n = 4, 20000
    memory = GaussianMemory()
    memory.add_class(7, _features(200, d, seed=2))
    samples = memory.sample(7, n, torch.Generator().manual_seed(0)).double()
    assert samples.shape == (n, d)
    mean, cov = memory.mean(7), memory.covariance(7)
    standard_error = (torch.diagonal(cov) / n).sqrt()
    assert ((samples.mean(dim=0) - mean).abs() < 4 * standard_error).all()
    rel = torch.linalg.matrix_norm(torch.cov(samples.T) - cov) / torch.linalg.matrix_norm(cov)
    assert rel < 0.05


def test_singular_covariance_is_factorised_with_jitter() -> None:
    d = 6
    memory = GaussianMemory(MemoryConfig(jitter_start=1e-6))
    memory.add_class(0, _features(20, d))
    v = torch.arange(1.0, d + 1, dtype=torch.float64)
    singular = torch.outer(v, v) - 1e-9 * torch.eye(d, dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(singular).info) != 0
    memory.update(0, covariance=singular)

    samples = memory.sample(0, 500, torch.Generator().manual_seed(1)).double()
    assert torch.isfinite(samples).all()
    # almost all variance lies along v, as the covariance says
    centred = samples - memory.mean(0)
    along = centred @ (v / v.norm())
    residual = centred - along[:, None] * (v / v.norm())
    assert residual.norm(dim=1).max() < 1e-2 * along.abs().max()


def test_hopeless_covariance_raises_clearly() -> None:
    memory = GaussianMemory()
    memory.add_class(0, _features(20, 3))
    # the largest jitter (1e-6 * 10**7 = 10) cannot fix this one
    with pytest.raises(RuntimeError, match="not positive definite"):
        memory.update(0, covariance=-100.0 * torch.eye(3, dtype=torch.float64))


def test_same_seed_same_samples() -> None:
    memory = GaussianMemory()
    memory.add_class(1, _features(30, 5, seed=3))
    memory.add_class(2, _features(30, 5, seed=4))
    x1, y1 = memory.sample_all(16, torch.Generator().manual_seed(5))
    x2, y2 = memory.sample_all(16, torch.Generator().manual_seed(5))
    x3, _ = memory.sample_all(16, torch.Generator().manual_seed(6))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert x1.shape == (32, 5) and y1.tolist() == [1] * 16 + [2] * 16


def test_update_replaces_the_factor() -> None:
    memory = GaussianMemory()
    memory.add_class(0, _features(30, 4))
    mean = memory.mean(0)
    before = memory.sample(0, 8, torch.Generator().manual_seed(0)).double()
    memory.update(0, covariance=4.0 * memory.covariance(0))
    after = memory.sample(0, 8, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(after - mean, 2.0 * (before - mean), rtol=1e-5, atol=1e-5)


def test_update_symmetrises_covariance() -> None:
    memory = GaussianMemory()
    memory.add_class(0, _features(30, 3))
    skewed = torch.eye(3, dtype=torch.float64)
    skewed[0, 1] = 0.2
    memory.update(0, mean=torch.ones(3), covariance=skewed)
    cov = memory.covariance(0)
    assert torch.equal(cov, cov.T) and cov[0, 1] == pytest.approx(0.1)
    assert memory.mean(0).dtype == torch.float64 and torch.equal(memory.mean(0), torch.ones(3))


def test_state_dict_round_trip_through_safetensors(tmp_path: Path) -> None:
    memory = GaussianMemory()
    for class_index in (5, 2, 9):
        memory.add_class(class_index, _features(10, 6, seed=class_index))
    save_file(memory.state_dict(), str(tmp_path / "memory.safetensors"))
    restored = GaussianMemory.from_state_dict(load_file(str(tmp_path / "memory.safetensors")))
    assert restored.class_indices == [5, 2, 9]
    for c in (5, 2, 9):
        assert torch.equal(restored.mean(c), memory.mean(c))
        assert torch.equal(restored.covariance(c), memory.covariance(c))
    assert restored.dim == 6


@pytest.mark.parametrize("dim", [None, 6])
def test_empty_memory_round_trips(tmp_path: Path, dim: int | None) -> None:
    save_file(GaussianMemory(dim=dim).state_dict(), str(tmp_path / "empty.safetensors"))
    restored = GaussianMemory.from_state_dict(load_file(str(tmp_path / "empty.safetensors")))
    assert len(restored) == 0 and restored.dim == dim
    x, y = restored.sample_all(4, torch.Generator().manual_seed(0))
    assert x.shape[0] == 0 and y.shape == (0,)


def test_clear_errors() -> None:
    memory = GaussianMemory()
    with pytest.raises(ValueError, match="at least 2"):
        memory.add_class(0, torch.randn(1, 4))
    memory.add_class(0, torch.randn(3, 4))
    with pytest.raises(ValueError, match="already in the memory"):
        memory.add_class(0, torch.randn(3, 4))
    with pytest.raises(ValueError, match="dimension 5"):
        memory.add_class(1, torch.randn(3, 5))
    with pytest.raises(KeyError, match="not in the memory"):
        memory.mean(42)


# ------------------------------------------------------------- shrinkage
def _sklearn_style_ledoit_wolf(x: np.ndarray) -> float:
    """Ledoit-Wolf intensity written as scikit-learn does (an independent reference)."""
    n, d = x.shape
    x = x - x.mean(axis=0)
    x2 = x**2
    emp_cov_trace = x2.sum(axis=0) / n
    mu = emp_cov_trace.sum() / d
    beta_ = (x2.T @ x2).sum()
    delta_ = ((x.T @ x) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2.0 * mu * emp_cov_trace.sum() + d * mu**2) / d
    return float(min(beta, delta) / delta)


def test_ledoit_wolf_intensity_matches_reference_and_falls_with_n() -> None:
    d = 24
    intensities = []
    for n in (10, 48, 400):
        x = _features(n, d, seed=n)
        rho = ledoit_wolf_intensity(x.double() - x.double().mean(dim=0))
        assert rho == pytest.approx(_sklearn_style_ledoit_wolf(x.double().numpy()), rel=1e-9)
        intensities.append(rho)
    assert intensities[0] > intensities[1] > intensities[2] >= 0.0


@pytest.mark.parametrize("n", [20, 500])
def test_ledoit_wolf_keeps_the_average_variance(n: int) -> None:
    """METHOD's switch adds mean(diag) to the diagonal whenever n < d, doubling the
    average variance at 500 images and d = 512; Ledoit-Wolf keeps the trace."""
    d, eps = 512, 1e-4
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    x = x * torch.linspace(0.2, 2.0, d, dtype=torch.float64)
    sample_var = torch.diagonal(torch.cov(x.T)).mean()
    lw = shrink_covariance(x, MemoryConfig(eps=eps))
    below = shrink_covariance(x, MemoryConfig(eps=eps, shrinkage="below_dim"))
    torch.testing.assert_close(torch.diagonal(lw).mean(), sample_var + eps, rtol=1e-10, atol=0)
    assert torch.diagonal(below).mean() / sample_var == pytest.approx(2.0, rel=1e-3)
    # and it is definite, well-conditioned even with n < d
    assert torch.linalg.eigvalsh(lw).min() > 0.01 * sample_var


# ---------------------------------------------------------- storage forms
def test_low_rank_covariance_keeps_the_diagonal_and_samples_exactly() -> None:
    d, r = 10, 3
    x = _features(400, d, seed=7)
    full, low = GaussianMemory(), GaussianMemory(MemoryConfig(covariance="low_rank", rank=r))
    full.add_class(0, x)
    low.add_class(0, x)
    cov_full, cov_low = full.covariance(0), low.covariance(0)
    torch.testing.assert_close(torch.diagonal(cov_low), torch.diagonal(cov_full), rtol=1e-5, atol=0)
    # the top-r part is the best rank-r approximation: residual off-diagonals only
    vals = torch.linalg.eigvalsh(cov_full)
    assert torch.linalg.matrix_norm(cov_low - cov_full, ord=2) <= vals[-r - 1] * 1.01 + 1e-6
    n = 40000
    samples = low.sample(0, n, torch.Generator().manual_seed(0)).double()
    rel = torch.linalg.matrix_norm(torch.cov(samples.T) - cov_low) / torch.linalg.matrix_norm(
        cov_low
    )
    assert rel < 0.03
    # Each also keeps a [d] third moment for exact merges (`merge_class`).
    assert low.nbytes() == 4 * (d + d * r + d + d) and full.nbytes() == 4 * (d + d * d + d)


def test_sample_classes_batched_on_a_device_and_per_class_generators() -> None:
    memory = GaussianMemory(MemoryConfig(covariance="low_rank", rank=2))
    for c in (4, 1, 8):
        memory.add_class(c, _features(30, 5, seed=c))
    x, y = memory.sample_classes([8, 4], 6, torch.Generator().manual_seed(0), device="cpu")
    assert x.shape == (12, 5) and x.dtype == torch.float32 and y.tolist() == [8] * 6 + [4] * 6
    # with a generator per class, a class's samples do not depend on its companions
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    pair, _ = memory.sample_classes([8, 4], 6, gens)
    alone, _ = memory.sample_classes([4], 6, [torch.Generator().manual_seed(2)])
    assert torch.equal(pair[6:], alone)
    with pytest.raises(ValueError, match="one generator per class"):
        memory.sample_classes([8, 4], 6, gens[:1])


def test_remove_class_and_nbytes() -> None:
    memory = GaussianMemory()
    for c in range(3):
        memory.add_class(c, _features(12, 6, seed=c))
    per_class = 4 * (6 + 36 + 6)  # mean, factor, third moment (for merges)
    assert memory.nbytes() == 3 * per_class
    memory.remove_class(1)
    assert memory.class_indices == [0, 2] and 1 not in memory and memory.nbytes() == 2 * per_class
    with pytest.raises(KeyError):
        memory.remove_class(1)
    memory.add_class(1, _features(12, 6, seed=1))  # may come back
    assert memory.class_indices == [0, 2, 1]


@pytest.mark.parametrize("form", ["full", "low_rank"])
def test_state_splits_per_class_and_concatenates_back(form: str) -> None:
    config = MemoryConfig(covariance=form, rank=3)  # type: ignore[arg-type]
    memory = GaussianMemory(config)
    for c in (5, 2, 9, 0):
        memory.add_class(c, _features(20, 6, seed=c))
    state = memory.state_dict()
    assert all(t.shape[0] == 4 for t in state.values())
    assert all(t.dtype in (torch.float32, torch.long) for t in state.values())
    # split per task ([5, 2] and [9, 0]) then concatenate in another order
    halves = [{k: v[s] for k, v in state.items()} for s in (slice(2, 4), slice(0, 2))]
    joined = {k: torch.cat([h[k] for h in halves]) for k in state}
    restored = GaussianMemory.from_state_dict(joined, config)
    assert restored.class_indices == [9, 0, 5, 2]
    for c in (5, 2, 9, 0):
        assert torch.equal(restored.mean(c), memory.mean(c))
        assert torch.equal(restored.covariance(c), memory.covariance(c))
        assert restored.count(c) == 20
    with pytest.raises(ValueError, match="twice"):
        GaussianMemory.from_state_dict({k: torch.cat([v, v]) for k, v in state.items()}, config)


def test_former_float64_state_loads_and_converts_between_forms() -> None:
    x = _features(40, 6, seed=3)
    cov = torch.cov(x.double().T) + 1e-4 * torch.eye(6, dtype=torch.float64)
    former = {
        "class_indices": torch.tensor([3]),
        "means": x.double().mean(dim=0, keepdim=True),
        "covariances": cov[None],
    }
    memory = GaussianMemory.from_state_dict(former)
    torch.testing.assert_close(memory.covariance(3), cov, rtol=1e-5, atol=1e-6)
    assert memory.state_dict()["means"].dtype == torch.float32
    low = GaussianMemory.from_state_dict(
        memory.state_dict(), MemoryConfig(covariance="low_rank", rank=2)
    )
    assert "factors" in low.state_dict() and low.state_dict()["factors"].shape == (1, 6, 2)
    torch.testing.assert_close(
        torch.diagonal(low.covariance(3)), torch.diagonal(cov), rtol=1e-5, atol=0
    )


def test_float32_storage_is_a_quarter_of_the_former_float64() -> None:
    memory = GaussianMemory()
    memory.add_class(0, _features(40, 32, seed=0))
    former_bytes = 8 * (32 + 32 * 32)  # float64 mean and covariance
    assert memory.nbytes() * 2 == former_bytes + 8 * 32  # + the third moment (for merges)
    packed = memory.state_dict()["cholesky_packed"]
    assert packed.shape == (1, 32 * 33 // 2)  # saved: the lower triangle only


def test_low_rank_refit_keeps_the_spectrum() -> None:
    """Calibration refits a low-rank covariance at every task: the fit must be (nearly)
    a fixed point, or the small eigenvalues shrink task after task (a Mahalanobis score
    then turns against old classes)."""
    d = 48
    x = _features(30, d, seed=11)
    memory = GaussianMemory(MemoryConfig(covariance="low_rank", rank=8))
    memory.add_class(0, x)
    first = memory.covariance(0)
    for _ in range(5):
        memory.update(0, covariance=memory.covariance(0))
    last = memory.covariance(0)
    # taking the top eigenvalues whole: 57% off and half the median eigenvalue after 5
    assert torch.linalg.matrix_norm(last - first) < 0.1 * torch.linalg.matrix_norm(first)
    median = torch.linalg.eigvalsh(first).median()
    assert torch.linalg.eigvalsh(last).median() == pytest.approx(float(median), rel=0.05)


def test_fecam_memory_score_ignores_the_feature_scale_and_separates_classes() -> None:
    from dmc_core.class_scores import MemoryScorer

    generator = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(3, 8, generator=generator)
    features = torch.cat([c + torch.randn(40, 8, generator=generator) for c in centres])
    labels = torch.arange(3).repeat_interleave(40)
    scores = {}
    for factor in (1.0, 5.0):
        memory = GaussianMemory(MemoryConfig(shrinkage="none", eps=0.0))
        for c in range(3):
            memory.add_class(c, factor * features[labels == c])
        scorer = MemoryScorer(memory, 3, "fecam", 30.0, torch.device("cpu"))
        scores[factor] = scorer(factor * features)
    torch.testing.assert_close(scores[1.0], scores[5.0])
    assert (scores[1.0].argmax(1) == labels).float().mean() >= 0.95
    with pytest.raises(ValueError, match="memory score must be one of"):
        MemoryScorer(memory, 3, "euclid", 30.0, torch.device("cpu"))  # type: ignore[arg-type]


def test_mahalanobis_scores_in_class_blocks_equal_the_direct_formula() -> None:
    from dmc_core.class_scores import mahalanobis_scores

    g = torch.Generator().manual_seed(0)
    x, means = torch.randn(7, 5, generator=g), torch.randn(11, 5, generator=g)
    roots = torch.randn(11, 5, 5, generator=g, dtype=torch.float64)
    precisions = roots @ roots.transpose(1, 2)
    diff = x.double()[:, None, :] - means.double()[None]
    direct = -0.5 * torch.einsum("ncd,cde,nce->nc", diff, precisions, diff)
    one_class_per_block = mahalanobis_scores(x, means, precisions, block_bytes=1)
    three_per_block = mahalanobis_scores(x, means, precisions, block_bytes=3 * 2 * 7 * 5 * 8)
    for scores in (one_class_per_block, three_per_block, mahalanobis_scores(x, means, precisions)):
        assert scores.shape == (7, 11)
        torch.testing.assert_close(scores.double(), direct.float().double())
