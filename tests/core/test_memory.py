"""Tests for the per-class Gaussian memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dmc_core.memory import GaussianMemory, MemoryConfig


def _features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g)
    return torch.randn(n, d, generator=g) @ mixing + 3.0 * torch.randn(d, generator=g)


def test_stats_match_numpy_when_enough_samples() -> None:
    n, d = 50, 8
    x = _features(n, d)
    memory = GaussianMemory(MemoryConfig(eps=1e-4))
    memory.add_class(3, x)
    ref = x.double().numpy()
    expected_cov = np.cov(ref, rowvar=False) + 1e-4 * np.eye(d)
    assert memory.mean(3).dtype == torch.float64
    np.testing.assert_allclose(memory.mean(3).numpy(), ref.mean(axis=0), rtol=0, atol=1e-10)
    np.testing.assert_allclose(memory.covariance(3).numpy(), expected_cov, rtol=0, atol=1e-10)
    assert memory.dim == d and len(memory) == 1 and memory.class_indices == [3]


def test_shrinkage_applied_when_fewer_samples_than_dim() -> None:
    n, d, a1, a2, eps = 5, 12, 1.0, 0.5, 1e-4
    x = _features(n, d, seed=1)
    memory = GaussianMemory(MemoryConfig(eps=eps, shrink_alpha1=a1, shrink_alpha2=a2))
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
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    # rank-deficient sample covariance (rank <= n-1 < d) becomes well-conditioned
    assert np.linalg.matrix_rank(cov) < d
    assert np.linalg.eigvalsh(got).min() > 0.1 * np.diag(cov).mean()


def test_samples_reproduce_mean_and_covariance() -> None:
    d, n = 4, 20000
    memory = GaussianMemory()
    memory.add_class(7, _features(200, d, seed=2))
    samples = memory.sample(7, n, torch.Generator().manual_seed(0))
    assert samples.shape == (n, d) and samples.dtype == torch.float64
    mean, cov = memory.mean(7), memory.covariance(7)
    standard_error = (torch.diagonal(cov) / n).sqrt()
    assert ((samples.mean(dim=0) - mean).abs() < 4 * standard_error).all()
    rel = torch.linalg.matrix_norm(torch.cov(samples.T) - cov) / torch.linalg.matrix_norm(cov)
    assert rel < 0.05


def test_singular_covariance_is_sampled_with_jitter() -> None:
    d = 6
    memory = GaussianMemory(MemoryConfig(jitter_start=1e-6))
    memory.add_class(0, _features(20, d))
    v = torch.arange(1.0, d + 1, dtype=torch.float64)
    singular = torch.outer(v, v) - 1e-9 * torch.eye(d, dtype=torch.float64)
    memory.update(0, covariance=singular)
    assert int(torch.linalg.cholesky_ex(memory.covariance(0)).info) != 0

    samples = memory.sample(0, 500, torch.Generator().manual_seed(1))
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
    memory.update(0, covariance=-100.0 * torch.eye(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="not positive definite"):
        memory.sample(0, 4, torch.Generator().manual_seed(0))


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


def test_update_invalidates_cached_cholesky() -> None:
    memory = GaussianMemory()
    memory.add_class(0, _features(30, 4))
    mean = memory.mean(0)
    before = memory.sample(0, 8, torch.Generator().manual_seed(0))
    memory.update(0, covariance=4.0 * memory.covariance(0))
    after = memory.sample(0, 8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(after - mean, 2.0 * (before - mean), rtol=1e-10, atol=1e-10)


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
