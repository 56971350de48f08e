"""GCPF (Wan, Gao, Li & Wen, "Industrial Image Anomaly Localization Based on Gaussian Clustering of Pretrained
Feature", IEEE Trans. Industrial Electronics 2022).

Per backbone stage, the pretrained features of every position of every training image are pooled and
clustered into K independent multivariate Gaussians (k-means start, then hard Mahalanobis reassignment with
Ledoit–Wolf covariances until stable). A test feature's distance is its Mahalanobis distance to the nearest
cluster; the per-stage maps are upsampled and averaged (multi-hierarchical scoring), then smoothed.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur, upsample
from engine.components.clustering import gaussian_assign, gaussian_clusters
from engine.components.features import extract_features
from engine.methods.base import BaseDetector
from engine.registry import register


@register(
    family="memory_bank", name="gcpf", localises=True,
    paper="Wan et al., IEEE Trans. Industrial Electronics 2022 (GCPF)",
    summary="Pretrained features of each stage clustered into K independent Gaussians; score = Mahalanobis "
            "distance to the nearest cluster, averaged over stages.",
    notes="EfficientNet-Lite0 blocks.1/2/4 (strides 4/8/16) stand in for WideResNet-50 layer1-3. K=10 clusters "
          "per stage, k-means start and hard Gaussian reassignment with Ledoit–Wolf covariances as the paper's "
          "code; per-stage maps upsampled, averaged, blurred with σ=4, image score = map maximum. The "
          "reassignment stops when no feature changes cluster or after `iters` rounds (paper: centre/covariance "
          "shift below 0.1). When a stage has more than max_points training features the clusters are fitted "
          "on a seeded random subset of that many (max_points=None uses all).",
    presets={"test": {"iters": 5}, "fast": {"iters": 10}, "quality": {"iters": 30, "max_points": None}},
)
class GCPF(BaseDetector):
    """K Gaussian clusters per stage; map = mean over stages of the min-over-clusters Mahalanobis distance."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), n_clusters: int = 10,
                 iters: int = 20, eps: float = 1e-4, max_points: int | None = 200_000, sigma: float = 4.0,
                 seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.n_clusters = n_clusters
        self.iters = iters
        self.eps = eps
        self.max_points = max_points
        self.sigma = sigma
        self.seed = seed

    def _features(self, images: ImageSet, progress: Progress | None = None) -> list[torch.Tensor]:
        kw = {"progress": progress} if progress else {}
        return extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                device=self.device_, **kw)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if self.n_clusters < 1:
            raise ConfigError(f"gcpf.n_clusters must be ≥ 1, got {self.n_clusters}")
        self.means_, self.precisions_, rounds = [], [], []
        g = torch.Generator().manual_seed(self.seed)
        for i, f in enumerate(self._features(train, progress)):
            progress("clustering", i / len(self.layers), {"layer": self.layers[i]})
            x = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
            if self.max_points is not None and x.shape[0] > self.max_points:
                x = x[torch.randperm(x.shape[0], generator=g)[: self.max_points]]
            means, precs, r = gaussian_clusters(x, self.n_clusters, iters=self.iters, eps=self.eps,
                                                seed=self.seed + i)
            self.means_.append(means)
            self.precisions_.append(precs)
            rounds.append(r)
        progress("clustering", 1.0, {})
        self.run_notes_ = {"gaussian_rounds": rounds}

    def _predict(self, images: ImageSet) -> Prediction:
        amap = torch.zeros(len(images), *images.size)
        for f, means, precs in zip(self._features(images), self.means_, self.precisions_, strict=True):
            n, c, h, w = f.shape
            dist, _ = gaussian_assign(f.permute(0, 2, 3, 1).reshape(-1, c), means, precs)
            amap += upsample(dist.reshape(n, h, w), images.size)
        amap = gaussian_blur(amap / len(self.layers), self.sigma)
        return Prediction(scores=amap.flatten(1).amax(1), maps=amap)

    def _state(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (m, p) in enumerate(zip(self.means_, self.precisions_, strict=True)):
            out[f"mean.{i}"] = m
            out[f"precision.{i}"] = p
        return out

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        n = len(self.layers)
        self.means_ = [tensors[f"mean.{i}"] for i in range(n)]
        self.precisions_ = [tensors[f"precision.{i}"] for i in range(n)]
