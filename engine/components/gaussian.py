"""Multivariate Gaussians with covariance shrinkage and Mahalanobis distances, batched over positions."""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.device import single_thread


def ledoit_wolf_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched Ledoit–Wolf shrunk covariance.

    x: (P, N, D) — P independent sets of N samples in D dims.
    Returns mean (P, D), covariance (P, D, D) = (1 − s) S + s μ I, shrinkage s (P,).
    """
    x = x.float()
    n, d = x.shape[1], x.shape[2]
    mean = x.mean(1)
    xc = x - mean[:, None]
    s = xc.transpose(1, 2) @ xc / n
    tr = torch.diagonal(s, dim1=1, dim2=2).sum(-1)
    mu = tr / d
    x2 = xc * xc
    beta_ = (x2.transpose(1, 2) @ x2).sum((1, 2))
    delta_ = (s * s).sum((1, 2))  # ||S||_F²
    beta = (beta_ / n - delta_) / n / d  # estimate of the sampling variance of S (scaled)
    delta = (delta_ - 2 * mu * tr + d * mu * mu) / d  # ||S − μI||_F² / d
    beta = torch.minimum(beta, delta)
    shrink = torch.where(delta > 0, beta / delta.clamp_min(1e-30), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=x.dtype)
    cov = (1 - shrink)[:, None, None] * s + (shrink * mu)[:, None, None] * eye
    return mean, cov, shrink


def gaussian_fit(x: torch.Tensor, *, shrinkage: str = "ledoit_wolf", eps: float = 0.01,
                 chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position Gaussian. x: (P, N, D). Returns mean (P, D) and precision (inverse covariance) (P, D, D).

    shrinkage "ledoit_wolf" shrinks towards μI then adds eps·I; "fixed" is the PaDiM paper's S + eps·I
    (with the unbiased N − 1 normaliser).
    """
    return gaussian_fit_chunks(x.shape[0], x.shape[2], lambda s, e: x[s:e], shrinkage=shrinkage, eps=eps,
                               chunk=chunk)


def pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    """(P, D, D) symmetric -> (P, D(D+1)/2): the lower triangle, row by row."""
    i, j = torch.tril_indices(m.shape[-1], m.shape[-1])
    return m[:, i, j]


def unpack_symmetric(t: torch.Tensor, d: int) -> torch.Tensor:
    """(P, D(D+1)/2) from `pack_symmetric` -> the (P, D, D) symmetric matrices."""
    i, j = torch.tril_indices(d, d)
    out = t.new_empty(t.shape[0], d, d)
    out[:, i, j] = t
    out[:, j, i] = t
    return out


def gaussian_fit_chunks(p: int, d: int, rows: Callable[[int, int], torch.Tensor], *,
                        shrinkage: str = "ledoit_wolf", eps: float = 0.01,
                        chunk: int = 8, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`gaussian_fit` of P positions whose samples come a chunk at a time: rows(s, e) -> (e − s, N, D).

    The (P, N, D) samples are never held at once (2.5 GB for PaDiM on 762 images of 288×256 px). Chunks with the
    values and the memory layout of the whole tensor's slices give the same result to the bit (the layout sets
    the order of the sums over N), whatever the chunk. Each chunk's work space is about 4 copies of it (two
    float32, one float64): 8 positions of 762 images × 176 channels are 4 MB (64 positions took 255 MB above the
    features at the fit's peak on mt's shapes against 79, and were no faster). packed: the precisions come as
    `pack_symmetric`'s (P, D(D+1)/2) triangles, half the memory (the Cholesky inverse is symmetric to the bit, so
    nothing is lost).
    """
    if shrinkage not in ("ledoit_wolf", "fixed"):
        raise ValueError(f"unknown shrinkage {shrinkage!r}")
    with single_thread():
        # Filled chunk by chunk: a list of chunks then torch.cat held the (P, D, D) precisions twice at the peak
        # (2 × 507 MB for PaDiM at 256 px).
        means = torch.empty(p, d)
        precs = torch.empty(p, d * (d + 1) // 2) if packed else torch.empty(p, d, d)
        eye = torch.eye(d)
        for s in range(0, p, chunk):
            xs = rows(s, min(s + chunk, p))
            if shrinkage == "ledoit_wolf":
                mean, cov, _ = ledoit_wolf_cov(xs)
            else:
                mean = xs.mean(1)
                xc = (xs - mean[:, None]).double()
                cov = (xc.transpose(1, 2) @ xc / max(1, xs.shape[1] - 1)).float()
                del xc
            prec = _spd_inverse(cov.float() + eps * eye)
            precs[s:s + chunk] = pack_symmetric(prec) if packed else prec
            means[s:s + chunk] = mean
    return means, precs


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """x: (B, P, D), mean (P, D), precision (P, D, D) -> distances (B, P) (square root of the quadratic form)."""
    diff = x - mean[None]
    # (P, B, D) @ (P, D, D) keeps the per-position matrix product batched over positions.
    with single_thread():
        left = torch.bmm(diff.transpose(0, 1), precision).transpose(0, 1)
    return (left * diff).sum(-1).clamp_min_(0).sqrt_()


def mahalanobis_chunks(p: int, rows: Callable[[int, int], torch.Tensor], mean: torch.Tensor,
                       packed_precision: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """`mahalanobis` of N samples at P positions that come a chunk of positions at a time, rows(s, e) ->
    (e − s, N, D), against mean (P, D) and `pack_symmetric` precisions (P, D(D+1)/2) -> distances (N, P).

    Each chunk's precisions are unpacked once for all N samples; the work space is about three (chunk, N, D)
    tensors (6.5 MB for 16 positions of 582 images × 176 channels; the distances are the same for any chunk).
    """
    d = mean.shape[1]
    out: torch.Tensor | None = None
    for s in range(0, p, chunk):
        e = min(s + chunk, p)
        dist = mahalanobis(rows(s, e).transpose(0, 1), mean[s:e], unpack_symmetric(packed_precision[s:e], d))
        if out is None:
            out = torch.empty(dist.shape[0], p)
        out[:, s:e] = dist  # (N, c)
    if out is None:
        raise ValueError("no positions to score")
    return out


def _spd_inverse(cov: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of symmetric positive-definite (P, D, D) matrices via Cholesky.

    float32 first (4× faster than float64 on CPU); any matrix whose float32 factorisation fails is
    redone in float64.
    """
    chol, info = torch.linalg.cholesky_ex(cov)
    out = torch.cholesky_inverse(chol)
    bad = info != 0
    if bad.any():
        out[bad] = torch.cholesky_inverse(torch.linalg.cholesky(cov[bad].double())).float()
    return out
