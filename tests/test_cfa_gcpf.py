"""Paper-specific pieces of CFA (soft-boundary loss, softmin score, fixed memory bank) and GCPF (Gaussian
clustering and nearest-cluster assignment)."""

from __future__ import annotations

import math

import pytest
import torch

from engine import registry
from engine.components.clustering import gaussian_assign, gaussian_clusters, kmeans, sq_dists
from engine.methods.memory_bank.cfa import cfa_loss, softmin_score


def test_cfa_loss_hand_example() -> None:
    # One patch; its squared distances to the memory, ascending: K = 3 attract, the next J = 3 repel.
    d = torch.tensor([[0.0, 0.02, 0.5, 0.05, 0.2, 1.0]])
    r, alpha = 0.1, 0.1  # r² = 0.01
    # L_att = mean(max(0, D − r²)) over [0, 0.02, 0.5] = (0 + 0.01 + 0.49) / 3
    # L_rep = mean(max(0, r² − D + α)) over [0.05, 0.2, 1.0] = (0.06 + 0 + 0) / 3
    expected = 0.5 / 3 + 0.06 / 3
    assert float(cfa_loss(d, 3, 3, r, alpha, nu=1.0)) == pytest.approx(expected, rel=1e-6)
    assert float(cfa_loss(d, 3, 3, r, alpha, nu=0.5)) == pytest.approx(2 * expected, rel=1e-6)
    # No hard negatives: only the attraction term is left.
    assert float(cfa_loss(d, 3, 0, r, alpha, nu=1.0)) == pytest.approx(0.5 / 3, rel=1e-6)


def test_cfa_loss_zero_inside_sphere_and_far_from_negatives() -> None:
    d = torch.tensor([[0.0, 0.0, 0.0, 5.0, 6.0, 7.0]])
    assert float(cfa_loss(d, 3, 3, 1e-5, 0.1, 1e-3)) == 0.0


def test_softmin_score_and_distances() -> None:
    d = torch.tensor([[1.0, 2.0]])
    assert float(softmin_score(d)[0]) == pytest.approx(1.0 / (1.0 + math.exp(-1.0)), rel=1e-6)
    phi = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    bank = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    torch.testing.assert_close(sq_dists(phi, bank), torch.tensor([[25.0, 1.0], [13.0, 1.0]]))


def test_cfa_bank_is_untrained_descriptor_mean_and_fixed(sample_brick) -> None:
    train, _ = sample_brick
    det = registry.create("cfa", preset="test", epochs=1)
    det.fit(train.subset(list(range(4))))
    feats = det._features(train.subset(list(range(4))))
    fresh = det._build(det.channels_)
    with torch.no_grad():
        expected = fresh(feats).mean(0).flatten(1).t()
    torch.testing.assert_close(det.memory_bank_, expected, rtol=1e-4, atol=1e-5)
    # ... while the descriptor itself was trained away from its initial weights.
    assert not torch.allclose(det.descriptor_.conv.weight, fresh.conv.weight)


def _two_blobs(n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, 2, generator=g) * torch.tensor([2.0, 0.2])
    b = torch.randn(n, 2, generator=g) * 0.2 + torch.tensor([0.0, 5.0])
    return torch.cat([a, b]), torch.cat([torch.zeros(n), torch.ones(n)]).long()


def test_kmeans_finds_separated_blobs() -> None:
    x, _ = _two_blobs()
    centres = kmeans(x, 2, seed=0)
    centres = centres[centres[:, 1].argsort()]
    torch.testing.assert_close(centres, torch.tensor([[0.0, 0.0], [0.0, 5.0]]), atol=0.3, rtol=0)


def test_gaussian_clusters_assign_by_mahalanobis() -> None:
    x, labels = _two_blobs()
    means, precs, rounds = gaussian_clusters(x, 2, seed=0)
    assert rounds >= 1
    _, idx = gaussian_assign(x, means, precs)
    agree = (idx == labels).float().mean().item()
    assert max(agree, 1 - agree) == 1.0
    # (3, 0.2) lies ≈1.5σ from the wide cluster along its long axis (σx = 2); (0, 2) lies across the wide
    # cluster's narrow axis (σy = 0.2) and far from the compact one: many σ from both (Ledoit–Wolf shrinkage
    # widens the narrow axis a little, so the bound is loose).
    wide = int(idx[labels == 0].mode().values)
    d, k = gaussian_assign(torch.tensor([[3.0, 0.2], [0.0, 2.0]]), means, precs)
    assert int(k[0]) == wide
    assert 1.0 < float(d[0]) < 2.5
    assert float(d[1]) > 5.0


def test_gaussian_assign_prefers_the_cluster_whose_shape_fits() -> None:
    # Cluster 0 wide along y (σy = 3), cluster 1 compact (σ = 0.1) at (0, 2). The point (0, 1.5) is closer to
    # cluster 1's centre (0.5 vs 1.5) but only 0.5σ from cluster 0 against 5σ from cluster 1.
    means = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    precs = torch.stack([torch.diag(torch.tensor([1.0, 1 / 9.0])), torch.eye(2) * 100.0])
    d, k = gaussian_assign(torch.tensor([[0.0, 1.5]]), means, precs)
    assert int(k[0]) == 0
    assert float(d[0]) == pytest.approx(0.5, rel=1e-5)
