"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework", ICPR 2021)."""

from __future__ import annotations

from typing import Any

import torch

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import gather_positions, to_pixel_map
from engine.components.features import extract_features
from engine.components.gaussian import gaussian_fit_chunks, mahalanobis_chunks, pack_symmetric
from engine.methods.base import BaseDetector
from engine.registry import register


@register(
    family="memory_bank", name="padim", localises=True, paper="Defard et al., ICPR 2021",
    summary="A Gaussian per patch position over multi-scale features; score = Mahalanobis distance.",
    notes="Three stages of EfficientNet-Lite0 (strides 4/8/16, 176 channels). EfficientNet-Lite0 has few enough "
          "channels that all are kept by default (n_features=None); the paper's random subset is available with "
          "n_features=d. Covariance as the paper: S + 0.01·I (shrinkage='ledoit_wolf' offers Ledoit–Wolf "
          "shrinkage, which scored lower on MPDD and the sample data).",
)
class PaDiM(BaseDetector):
    """Per-position multivariate Gaussian of normal patch embeddings; map = Mahalanobis distance."""

    reads_test_features_once = True

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), n_features: int | None = None,
                 shrinkage: str = "fixed", eps: float = 0.01, sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.n_features = n_features
        self.shrinkage = shrinkage
        self.eps = eps
        self.sigma = sigma
        self.seed = seed

    def _features(self, images: ImageSet, progress: Progress | None = None) -> list[torch.Tensor]:
        """The cached backbone features of `self.layers`, each (N, C_l, h_l, w_l)."""
        kw = {"progress": progress} if progress else {}
        return extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                device=self.device_, **kw)

    def _rows(self, feats: list[torch.Tensor]):
        """rows(s, e) -> (e − s, N, d): the embedding's samples at positions s..e of the first layer's grid
        (layers concatenated, nearest-resampled, channel subset applied), made a chunk at a time."""
        h, w = feats[0].shape[-2:]
        subset = len(self.channels_) != sum(f.shape[1] for f in feats)

        def rows(s: int, e: int) -> torch.Tensor:
            x = gather_positions(feats, (h, w), torch.arange(s, e))  # a view of (N, total, e − s)
            # the subset taken before the permutation keeps the layout (and so the sums' order) of the whole map's
            return x.permute(1, 2, 0)[:, self.channels_].permute(2, 0, 1) if subset else x

        return rows

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        from engine.backbones import stage_info

        total = sum(s.channels for s in stage_info(self.backbone) if s.name in self.layers)
        g = torch.Generator().manual_seed(self.seed)
        keep = total if self.n_features is None else min(self.n_features, total)
        self.channels_ = torch.randperm(total, generator=g)[:keep].sort().values
        feats = self._features(train, progress)
        h, w = feats[0].shape[-2:]
        progress("gaussian", 0.0, {"positions": h * w})
        self.mean_, self.precision_ = gaussian_fit_chunks(h * w, keep, self._rows(feats), shrinkage=self.shrinkage,
                                                          eps=self.eps, packed=True)
        self.grid_ = (h, w)
        progress("gaussian", 1.0, {})

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._features(images)
        h, w = feats[0].shape[-2:]
        dist = mahalanobis_chunks(h * w, self._rows(feats), self.mean_, self.precision_)  # (N, h·w)
        del feats  # handed over by the runner: this frees them before the full-size maps are made
        maps = to_pixel_map(dist.reshape(-1, h, w), images.size, self.sigma)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "precision": self.precision_, "channels": self.channels_,
                "grid": torch.tensor(self.grid_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_, self.precision_ = tensors["mean"], tensors["precision"]
        if self.precision_.dim() == 3:  # saved before the precisions were stored as triangles
            self.precision_ = pack_symmetric(self.precision_)
        self.channels_ = tensors["channels"]
        self.grid_ = tuple(tensors["grid"].tolist())
