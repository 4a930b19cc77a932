"""Log-domain Sinkhorn with uniform marginals over a cost given in blocks of rows.

The K x n cost is never needed whole: `cost_block(b)` returns the rows of block b
(computed or cached by the caller), so memory is bounded by one block. The iterations
are POT's `ot.sinkhorn(..., method="sinkhorn_log")` (column then row update, the
column-marginal error checked every 10 iterations), in the dtype and on the device of
the blocks, so with one block the result is POT's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["SinkhornPotentials", "sinkhorn_log_blocks"]


@dataclass
class SinkhornPotentials:
    """Log-scalings: plan = exp(-cost / reg + u[:, None] + v[None, :])."""

    u: torch.Tensor  # [K]
    v: torch.Tensor  # [n]
    iterations: int
    column_error: float  # L2 violation of the column marginal at the last check


def sinkhorn_log_blocks(
    cost_block: Callable[[int], torch.Tensor],
    block_sizes: Sequence[int],
    n_cols: int,
    reg: float,
    num_iter_max: int = 1000,
    stop_threshold: float = 1e-9,
) -> SinkhornPotentials:
    """Entropic OT between uniform weights on K = sum(block_sizes) rows and n_cols columns."""
    if reg <= 0:
        raise ValueError("reg must be > 0")
    n_rows = sum(block_sizes)
    offsets = [0]
    for size in block_sizes:
        offsets.append(offsets[-1] + size)
    probe = cost_block(0)
    dtype, device = probe.dtype, probe.device
    del probe  # a block may be recomputed rather than held
    log_a, log_b = -math.log(n_rows), -math.log(n_cols)
    u = torch.zeros(n_rows, dtype=dtype, device=device)

    def pass_over_rows(v: torch.Tensor | None) -> torch.Tensor:
        """Update u block by block (when v is given); return the column logsumexp of
        -cost/reg + u, accumulated over the blocks."""
        acc = torch.full((n_cols,), -math.inf, dtype=dtype, device=device)
        for b, (lo, hi) in enumerate(itertools.pairwise(offsets)):
            scaled = cost_block(b) / -reg
            if v is not None:
                u[lo:hi] = log_a - torch.logsumexp(scaled + v, dim=1)
            acc = torch.logaddexp(acc, torch.logsumexp(scaled + u[lo:hi, None], dim=0))
        return acc

    column_lse = pass_over_rows(None)
    v = torch.zeros(n_cols, dtype=dtype, device=device)
    error, iterations = math.inf, 0
    b = torch.full((n_cols,), 1.0 / n_cols, dtype=dtype, device=device)
    for iterations in range(1, num_iter_max + 1):
        v = log_b - column_lse
        column_lse = pass_over_rows(v)
        if (iterations - 1) % 10 == 0:
            error = float(torch.linalg.vector_norm(torch.exp(column_lse + v) - b))
            if error < stop_threshold:
                break
    return SinkhornPotentials(u=u, v=v, iterations=iterations, column_error=error)
