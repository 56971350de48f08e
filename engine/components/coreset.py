"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, Alg. 1).

The selection runs on a Johnson–Lindenstrauss random projection of the features, as in the paper,
and each greedy step updates the distance of every point to its nearest centre in one vectorised
pass (||x||² + ||c||² − 2 x·c), so the Python loop runs once per selected centre, not per point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def random_projection(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(N, D) -> (N, dim) Gaussian random projection (identity when D <= dim)."""
    if x.shape[1] <= dim:
        return x
    w = torch.randn(x.shape[1], dim, generator=generator, dtype=x.dtype) / math.sqrt(dim)
    return x @ w.to(x.device)


def greedy_coreset(x: torch.Tensor, n: int, *, proj_dim: int = 128, seed: int = 0,
                   progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of the rows of x (N, D); n is clipped to N.

    Starts from a seeded random point, then repeatedly adds the point farthest from the selected set.
    `progress(fraction)` is called about every 2% of the selections (it may raise to cancel).
    """
    n_total = x.shape[0]
    n = max(1, min(int(n), n_total))
    if n == n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    # (D, N) layout: one centre against all points is a vector-matrix product that streams the
    # matrix once, several times faster on CPU than a matrix-vector product in (N, D) layout.
    zt = random_projection(x.float(), proj_dim, g).t().contiguous()
    sq = (zt * zt).sum(0)
    selected = torch.empty(n, dtype=torch.int64)
    j = int(torch.randint(n_total, (1,), generator=g))
    selected[0] = j
    mind = (sq + sq[j] - 2.0 * (zt[:, j] @ zt)).clamp_min_(0)
    every = max(1, n // 50)
    for i in range(1, n):
        if progress is not None and i % every == 0:
            progress(i / n)
        j = int(torch.argmax(mind))
        selected[i] = j
        buf = zt[:, j] @ zt
        buf.mul_(-2.0).add_(sq).add_(sq[j])
        torch.minimum(mind, buf, out=mind)
    return selected
