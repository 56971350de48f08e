"""Greedy k-center coreset selection (PatchCore, Roth et al. 2022, Alg. 1).

The selection runs on a Johnson–Lindenstrauss random projection of the features, as in the paper.
Its result is exactly that of the plain greedy loop

    min_d = dist(z, z[first]);  repeat: j = argmax(min_d) (lowest index on ties); min_d = min(min_d, dist(z, z[j]))

but the plain loop streams all N points once per selected centre (78k passes over 780k points for a 10%
coreset of 762 images at 256 px: hours on a CPU). Here most points are updated late and in blocks:

* `bound[x]` is the exact min_d of x over the first `seen[x]` centres, so an upper bound of its current
  min_d (distances only shrink as centres are added);
* a small active set A = {x : bound[x] ≥ τ} is kept exact after every centre (|A| ≈ `active` points);
  while the largest value in A is ≥ τ it is the global maximum, since every other point is below τ;
* when A runs dry, τ drops to the `active`-th largest bound and the points that cross it catch up with
  the centres they have not seen, in blocks: one matrix product per block of centres gives every
  distance to within a proven error, and only the pairs that may hold the minimum are recomputed
  exactly. Points whose bound stays below τ are never touched again.

Exact identity needs each distance to have the same bits however many rows are computed together, so
exact distances are squared differences summed by an explicit pairwise tree of element-wise adds
(`_sqdist`), never a BLAS product whose summation order depends on the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

# Points kept exact after every centre: the active set is refilled to about `size` points, starting at
# _ACTIVE and doubled (up to _MAX_ACTIVE) while refills come so often that their passes over all N
# points cost more than the steps they serve, halved when they come rarely.
_ACTIVE = 4096
_MAX_ACTIVE = 65_536
# Centres per matrix product when points catch up (with _ROW_CHUNK rows: a 64 MB block).
_CENTRE_BLOCK = 2048


def _product_err(width: int) -> float:
    """Bound on |A − d²| / (|x|² + |c|²) for a float32 product distance A = |x|² + |c|² − 2x·c.

    Any summation order gives a dot-product error ≤ w·u·|x||c| and norm errors ≤ w·u·|x|² (u = 2⁻²⁴);
    this is 4× that plus a floor (3e-5 for 128 dims, whereas the error seen is ~1e-7).
    """
    return 1e-5 + 4 * width * 2.0**-24


# Relative error of a pairwise-summed float32 squared distance: ≤ (log2(w) + 2)·u ≈ 1e-6.
_TREE_ERR = 1e-5
_ROW_CHUNK = 8192


def random_projection(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(N, D) -> (N, dim) Gaussian random projection (identity when D <= dim)."""
    if x.shape[1] <= dim:
        return x
    w = torch.randn(x.shape[1], dim, generator=generator, dtype=x.dtype) / math.sqrt(dim)
    return x @ w.to(x.device)


def _pad_pow2(z: torch.Tensor) -> torch.Tensor:
    """(N, w) -> (N, 2^⌈log2 w⌉) with zero columns appended (they add exact zeros to every distance)."""
    w = z.shape[1]
    width = 1 << max(0, (w - 1).bit_length())
    if width == w:
        return z
    return torch.cat([z, z.new_zeros(z.shape[0], width - w)], dim=1)


def _sqdist(rows: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared distances (M,) from rows (M, w) to c, one point (w,) or one per row (M, w); w a power of two.

    Summed by halving the width with element-wise adds, so each value's bits depend only on its own row
    and centre (not on M, the memory layout, threads or the BLAS build). Large M runs in row chunks that
    stay in cache.
    """
    m = rows.shape[0]
    if m > _ROW_CHUNK:
        out = rows.new_empty(m)
        for a in range(0, m, _ROW_CHUNK):
            out[a:a + _ROW_CHUNK] = _sqdist(rows[a:a + _ROW_CHUNK], c if c.dim() == 1 else c[a:a + _ROW_CHUNK])
        return out
    s = rows - c
    s = s.mul_(s)
    while s.shape[1] > 1:
        h = s.shape[1] // 2
        s = s[:, :h] + s[:, h:]
    return s[:, 0]


def _row_sqnorms(z: torch.Tensor) -> torch.Tensor:
    """(N,) squared norms of the rows of z (N, w), in row chunks (z * z of all rows at once is a copy of z)."""
    out = z.new_empty(z.shape[0])
    for a in range(0, z.shape[0], _ROW_CHUNK):
        r = z[a:a + _ROW_CHUNK]
        out[a:a + _ROW_CHUNK] = (r * r).sum(1)
    return out


def greedy_coreset(x: torch.Tensor, n: int, *, proj_dim: int = 128, seed: int = 0,
                   progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Indices (n,) of a greedy k-center coreset of the rows of x (N, D); n is clipped to [1, N].

    Starts from a seeded random point, then repeatedly adds the point farthest (squared Euclidean
    distance on the projection, see `_sqdist`) from the selected set, the lowest index among equally
    far points. n = N returns arange(N). `progress(fraction)` is called about every 2% of the selections
    (it may raise to cancel).
    """
    n = max(1, min(int(n), x.shape[0])) if x.shape[0] else 0
    if n == x.shape[0] and n:
        return torch.arange(n)
    z, first = coreset_projection(x, proj_dim=proj_dim, seed=seed)
    return greedy_k_center(z, n, first, progress=progress)


def coreset_projection(x: torch.Tensor, *, proj_dim: int = 128, seed: int = 0) -> tuple[torch.Tensor, int]:
    """What `greedy_coreset` selects on: the seeded projection z (N, min(D, proj_dim)) of the rows of x (N, D)
    and the seeded first row. ``greedy_k_center(z, n, first)`` then gives greedy_coreset's indices, and x may be
    freed before it runs (PatchCore's 534 MB of patches on 762 images of 288×256 px).

    ValueError for no rows or for NaN / infinite features.
    """
    n_total = x.shape[0]
    if n_total == 0:
        raise ValueError("greedy_coreset: there are no feature rows to select from")
    if not all(bool(torch.isfinite(x[a:a + _ROW_CHUNK]).all()) for a in range(0, n_total, _ROW_CHUNK)):
        raise ValueError("greedy_coreset: the features contain NaN or infinite values")
    g = torch.Generator().manual_seed(seed)
    z = random_projection(x.float(), proj_dim, g).contiguous()
    first = int(torch.randint(n_total, (1,), generator=g))
    return z, first


def coreset_projection_chunks(chunks: Iterable[torch.Tensor], n_total: int, *, proj_dim: int = 128,
                              seed: int = 0) -> tuple[torch.Tensor, int]:
    """`coreset_projection` of the rows that `chunks` yields in order ((m_i, D) each, Σ m_i = n_total), without
    the (N, D) rows ever held at once: z (N, min(D, proj_dim)) is filled a chunk at a time.

    The same z to the bit as `coreset_projection` of the stacked rows: the projection matrix and the first row
    come from the same generator calls, and a block of two or more rows times the matrix gives those rows of the
    whole product (the row-blocked product keeps each row's sum order; tested; a single row would take the
    matrix-vector path, so it is projected as a row of a two-row product). ValueError as `coreset_projection`,
    and when the chunks do not hold n_total rows.
    """
    if n_total == 0:
        raise ValueError("greedy_coreset: there are no feature rows to select from")
    g = torch.Generator().manual_seed(seed)
    z: torch.Tensor | None = None
    w: torch.Tensor | None = None
    row = 0
    for x in chunks:
        if not all(bool(torch.isfinite(x[a:a + _ROW_CHUNK]).all()) for a in range(0, x.shape[0], _ROW_CHUNK)):
            raise ValueError("greedy_coreset: the features contain NaN or infinite values")
        x = x.float()
        if z is None:
            if x.shape[1] > proj_dim:  # as random_projection: identity when D <= proj_dim
                w = torch.randn(x.shape[1], proj_dim, generator=g, dtype=x.dtype) / math.sqrt(proj_dim)
            z = torch.empty(n_total, x.shape[1] if w is None else proj_dim, dtype=x.dtype)
        if row + x.shape[0] > n_total:
            raise ValueError(f"coreset_projection_chunks: more than the {n_total} rows announced")
        if w is None:
            z[row:row + x.shape[0]] = x
        elif x.shape[0] == 1 and n_total > 1:  # one row is a matrix-vector product, summed in another order:
            z[row:row + 1] = (torch.cat([x, x]) @ w)[:1]  # as a row of a matrix product, like the stacked rows'
        else:
            z[row:row + x.shape[0]] = x @ w
        row += x.shape[0]
    if z is None or row != n_total:
        raise ValueError(f"coreset_projection_chunks: {row} rows for the {n_total} announced")
    first = int(torch.randint(n_total, (1,), generator=g))
    return z, first


def greedy_k_center(z: torch.Tensor, n: int, first: int, *, progress: Callable[[float], None] | None = None,
                    active: int = _ACTIVE, max_active: int = _MAX_ACTIVE,
                    centre_block: int = _CENTRE_BLOCK) -> torch.Tensor:
    """Indices (n,) of the greedy k-center order of the rows of z (N, w), starting at row `first`.

    Same indices as the plain loop over all N points per step (module docstring); `active`,
    `max_active` and `centre_block` only change the speed.
    """
    n_total = z.shape[0]
    z = _pad_pow2(z.float()).contiguous()
    dev = z.device
    sq = _row_sqnorms(z)  # (N,) for the product distances only
    p_err = _product_err(z.shape[1])
    selected = torch.empty(n, dtype=torch.int64, device=dev)
    selected[0] = first
    bound = _sqdist(z, z[first])  # (N,) exact min_d over the first seen[x] centres
    seen = torch.ones(n_total, dtype=torch.int64, device=dev)
    size = max(1, min(int(active), n_total))
    max_size = max(size, min(int(max_active), n_total))
    last_refill = 0
    tau = math.inf
    act = torch.empty(0, dtype=torch.int64, device=dev)  # active points (ascending), exact after each centre
    act_d = bound[act]
    act_z = z[act]
    every = max(1, n // 50)
    for i in range(1, n):
        if progress is not None and i % every == 0:
            progress(i / n)
        pos = int(torch.argmax(act_d)) if act.numel() else -1
        if pos < 0 or float(act_d[pos]) < tau:
            bound[act] = act_d
            seen[act] = i
            if i > 1:
                served = (i - last_refill) * size
                size = min(2 * size, max_size) if served < n_total else size // 2 if served > 8 * n_total else size
                size = max(size, min(int(active), n_total))
            last_refill = i
            tau, act = _refill(z, sq, p_err, bound, seen, selected[:i], size, centre_block)
            act_d = bound[act]
            act_z, act_sq = z[act], sq[act]
            act_err = act_sq * p_err
            pos = int(torch.argmax(act_d))  # first maximum = lowest index: `act` is ascending
        j = int(act[pos])
        selected[i] = j
        # Only the active points that the product distance cannot rule out get an exact distance to z[j].
        c = z[j]
        prod = torch.addmv(act_sq, act_z, c, alpha=-2.0)  # |x|² − 2x·c, + |c|² below
        c_sq = float(sq[j])
        lim = act_d * (1 + _TREE_ERR) + (act_err + c_sq * p_err - c_sq)
        near = (prod <= lim).nonzero().squeeze(1)
        if near.numel():
            act_d[near] = torch.minimum(act_d[near], _sqdist(act_z[near], c))
    return selected.cpu()


def _refill(z: torch.Tensor, sq: torch.Tensor, p_err: float, bound: torch.Tensor, seen: torch.Tensor,
            centres: torch.Tensor, active: int, centre_block: int) -> tuple[float, torch.Tensor]:
    """Lower τ until the active set {bound ≥ τ} (all exact) holds a value ≥ τ; returns (τ, active indices).

    Updates bound/seen in place for the points that caught up with `centres` (k,).
    """
    k = centres.numel()
    while True:
        tau_t = torch.topk(bound, active, sorted=False).values.min()
        stale = ((bound >= tau_t) & (seen < k)).nonzero().squeeze(1)
        if stale.numel():
            _catch_up(z, sq, p_err, bound, seen, stale, centres, centre_block)
        act = (bound >= tau_t).nonzero().squeeze(1)
        if act.numel():  # all exact now; every other point is below τ
            return float(tau_t), act


def _catch_up(z: torch.Tensor, sq: torch.Tensor, p_err: float, bound: torch.Tensor, seen: torch.Tensor,
              rows: torch.Tensor, centres: torch.Tensor, centre_block: int) -> None:
    """Bring bound[rows] to the exact min over all `centres` (k,), from centre seen[row] on; seen[rows] = k.

    Per block of centres: product distances A (r, b) with |A − exact| ≤ err; a pair can hold the row's
    minimum only if A − err ≤ the best A + err of the row (or its bound), and only those pairs are
    recomputed with `_sqdist`.
    """
    k = centres.numel()
    rows = rows[torch.argsort(seen[rows])]
    for r0 in range(0, rows.numel(), _ROW_CHUNK):  # bounds the (rows, centres) block in memory
        part = rows[r0:r0 + _ROW_CHUNK]
        start = seen[part]  # ascending
        zr, sqr = z[part], sq[part]
        best = bound[part].clone()
        for a in range(int(start[0]), k, centre_block):
            b = min(a + centre_block, k)
            r = int(torch.searchsorted(start, b))  # rows that have not seen all of this block
            c_idx = centres[a:b]
            zc, sqc = z[c_idx], sq[c_idx]
            # prod = |c|² − 2x·c (r, b): the row term |x|² and the error bound (per row, with the block's
            # largest |c|²) go into row thresholds, so the block is read only a few times.
            prod = torch.addmm(sqc[None, :], zr[:r], zc.t(), alpha=-2.0)
            err = (sqr[:r] + float(sqc.max())) * p_err
            upper = torch.minimum(best[:r], (prod.amin(1) + sqr[:r] + err) * (1 + _TREE_ERR))
            limit = upper / (1 - _TREE_ERR) + err - sqr[:r]
            ri, ci = (prod <= limit[:, None]).nonzero(as_tuple=True)
            exact = _sqdist(zr[ri], zc[ci])
            best[:r] = best[:r].scatter_reduce(0, ri, exact, "amin")
        bound[part] = best
    seen[rows] = k
