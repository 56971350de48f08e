"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", 2020)."""

from __future__ import annotations

from typing import Any

import torch

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import resize_and_concat, to_pixel_map
from engine.components.features import extract_features
from engine.components.knn import NearestNeighbours
from engine.methods.base import BaseDetector
from engine.registry import register


@register(
    family="memory_bank", name="spade", localises=True, paper="Cohen & Hoshen, arXiv 2020",
    summary="kNN over whole-image features picks the closest normal images; pixel kNN against their "
            "feature pyramids localises.",
    notes="Image kNN on the globally pooled last stage (blocks.6); pixel gallery = feature maps of the "
          "k_gallery nearest normal images (paper: all K; 'quality' preset uses 50) at stride 8.",
    presets={"fast": {"k_gallery": 10}, "quality": {"k_gallery": 50}},
)
class SPADE(BaseDetector):
    """Two-stage kNN. Image score: mean distance to the k_images nearest normal images (pooled features).
    Pixel score: distance to the nearest pixel feature among the k_gallery nearest images' pyramids."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 global_layer: str = "blocks.6", layers: tuple[str, ...] = ("blocks.2", "blocks.4"),
                 k_images: int = 50, k_gallery: int = 10, sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.global_layer = global_layer
        self.layers = tuple(layers)
        self.k_images = k_images
        self.k_gallery = k_gallery
        self.sigma = sigma
        self.seed = seed

    def feature_layers(self) -> tuple[str, ...]:
        return (self.global_layer, *self.layers)

    def _features(self, images: ImageSet, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled (N, C_g) image features and (N, D, h, w) pixel features."""
        kw = {"progress": progress} if progress else {}
        feats = extract_features(images, (self.global_layer, *self.layers), backbone=self.backbone,
                                 weights=self.weights, device=self.device_, **kw)
        pooled = feats[0].mean((2, 3))
        return pooled, resize_and_concat(feats[1:])

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        self.train_pooled_, self.train_pixels_ = self._features(train, progress)
        self._knn = NearestNeighbours(self.train_pooled_, self.device_)

    def _predict(self, images: ImageSet) -> Prediction:
        pooled, pixels = self._features(images)
        n, d, h, w = pixels.shape
        k = min(self.k_images, self.train_pooled_.shape[0])
        dist, nbrs = self._knn.search(pooled, k)
        scores = dist.mean(1)
        kg = min(self.k_gallery, k)
        maps = torch.empty(n, h, w)
        for i in range(n):
            gallery = self.train_pixels_[nbrs[i, :kg]].permute(0, 2, 3, 1).reshape(-1, d)
            pd, _ = NearestNeighbours(gallery, self.device_).search(pixels[i].permute(1, 2, 0).reshape(-1, d), 1)
            maps[i] = pd[:, 0].reshape(h, w)
        return Prediction(scores=scores, maps=to_pixel_map(maps, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"pooled": self.train_pooled_, "pixels": self.train_pixels_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.train_pooled_, self.train_pixels_ = tensors["pooled"], tensors["pixels"]
        self._knn = NearestNeighbours(self.train_pooled_, self.device_)
