"""Clustering of feature vectors: seeded k-means and hard Gaussian clustering (k-Gaussians).

Shapes: x (N, D) feature vectors; K clusters; means (K, D); precisions (K, D, D).
Used by GCPF (Gaussian clusters of pretrained features) and CFA (k-means compression of its memory bank).
"""

from __future__ import annotations

import torch

from engine.components.gaussian import _spd_inverse, ledoit_wolf_cov, mahalanobis


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, K) between rows of x (N, D) and c (K, D); differentiable."""
    return ((x * x).sum(1, keepdim=True) + (c * c).sum(1)[None] - 2.0 * x @ c.t()).clamp_min(0)


def _nearest_centre(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Index (N,) of the Euclidean-nearest row of centres (K, D) for each row of x (N, D), in chunks of rows."""
    return torch.cat([sq_dists(x[s:s + chunk], centres).argmin(1) for s in range(0, x.shape[0], chunk)])


def kmeans(x: torch.Tensor, k: int, *, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means from k seeded random rows. x (N, D) -> centres (k', D), k' = min(k, N).

    Stops when the mean centre shift falls below `tol` times the data's mean norm, or after `iters` rounds.
    An emptied cluster keeps its previous centre.
    """
    x = x.float()
    k = max(1, min(int(k), x.shape[0]))
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    scale = float(x.norm(dim=1).mean()) or 1.0
    for _ in range(iters):
        assign = _nearest_centre(x, centres)
        new = _cluster_means(x, assign, k, centres)
        shift = float((new - centres).norm(dim=1).mean())
        centres = new
        if shift < tol * scale:
            break
    return centres


def _cluster_means(x: torch.Tensor, assign: torch.Tensor, k: int, previous: torch.Tensor) -> torch.Tensor:
    """Mean of each cluster's rows (K, D); clusters without rows keep `previous`."""
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=k).to(x.dtype)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], previous)


def gaussian_assign(x: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor,
                    chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest Gaussian cluster by Mahalanobis distance.

    x (N, D), means (K, D), precisions (K, D, D) -> (distance to the nearest cluster (N,), its index (N,)).
    """
    dists, idx = [], []
    for s in range(0, x.shape[0], chunk):
        xb = x[s:s + chunk].float()
        d = mahalanobis(xb[:, None].expand(-1, means.shape[0], -1), means, precisions)  # (B, K)
        m = d.min(1)
        dists.append(m.values)
        idx.append(m.indices)
    return torch.cat(dists), torch.cat(idx)


def _cluster_gaussians(x: torch.Tensor, assign: torch.Tensor, k: int, eps: float,
                       means: torch.Tensor, precisions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit–Wolf Gaussian of each cluster's rows; a cluster with fewer than 2 rows keeps its old Gaussian
    (or, before any exists, gets an identity precision)."""
    d = x.shape[1]
    new_means = means.clone()
    new_prec = torch.eye(d).repeat(k, 1, 1) if precisions is None else precisions.clone()
    for j in range(k):
        rows = x[assign == j]
        if rows.shape[0] < 2:
            continue
        mean, cov, _ = ledoit_wolf_cov(rows[None])
        new_means[j] = mean[0]
        new_prec[j] = _spd_inverse(cov + eps * torch.eye(d))[0]
    return new_means, new_prec


def gaussian_clusters(x: torch.Tensor, k: int, *, iters: int = 20, eps: float = 1e-4, seed: int = 0,
                      kmeans_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Hard Gaussian clustering (GCPF's k-Gaussians): k-means start, then alternate
    (1) assign every row to the cluster of smallest Mahalanobis distance and
    (2) refit each cluster's mean and Ledoit–Wolf covariance (+ eps·I), until no row changes cluster.

    x (N, D) -> means (K, D), precisions (K, D, D), rounds run. K = min(k, N).
    """
    x = x.float()
    centres = kmeans(x, k, iters=kmeans_iters, seed=seed)
    k = centres.shape[0]
    assign = _nearest_centre(x, centres)
    means, precs = _cluster_gaussians(x, assign, k, eps, centres, None)
    rounds = 0
    while rounds < iters:
        rounds += 1
        _, new_assign = gaussian_assign(x, means, precs)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
        means, precs = _cluster_gaussians(x, assign, k, eps, means, precs)
    return means, precs, rounds
