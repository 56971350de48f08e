"""FCDD (Liznerski et al., "Explainable Deep One-Class Classification", ICLR 2021).

Shapes: N images (3, H, W) -> frozen backbone features (N, D, h, w) (stride 8) -> trainable fully convolutional
head -> φ (N, h, w) -> pseudo-Huber heatmap A = sqrt(φ² + 1) − 1 ≥ 0 (N, h, w) -> pixel map (N, H, W).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.features import patch_features
from engine.components.synthetic_anomalies import make_anomalies
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


def pseudo_huber(phi: torch.Tensor) -> torch.Tensor:
    """FCDD's heatmap A = sqrt(φ² + 1) − 1, elementwise (any shape), ≥ 0."""
    return torch.sqrt(phi * phi + 1.0) - 1.0


def fcdd_loss(heatmap: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """FCDD's objective (paper Eq. 2) on heatmaps (B, h, w) with image labels (B,) in {0, 1}.

    normal: mean(A); anomalous: −log(1 − exp(−mean(A))). Returns the mean over the batch (scalar).
    """
    m = heatmap.flatten(1).mean(1)
    anomalous = -torch.log(-torch.expm1(-m.clamp_min(1e-6)))
    return torch.where(labels.bool(), anomalous, m).mean()


class FCDDHead(nn.Module):
    """Trainable fully convolutional part on top of the frozen backbone: (B, D, h, w) -> φ (B, h, w).

    1x1 conv (D -> hidden) + LeakyReLU, then the paper's final 1x1 conv to one channel.
    """

    def __init__(self, in_channels: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.LeakyReLU(0.1, inplace=True),
                                 nn.Conv2d(hidden, 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w)."""
        return self.net(f)[:, 0]


@register(
    family="one_class", name="fcdd", localises=True, trained=True, paper="Liznerski et al., ICLR 2021",
    summary="Fully convolutional one-class network: normal patches map near zero, synthetic outliers far; "
            "the pseudo-Huber output is itself the heatmap.",
    notes="Frozen ImageNet EfficientNet-Lite0 (blocks.2+blocks.4, stride 8, channel-standardised, no local averaging) "
          "instead of a "
          "partly fine-tuned VGG11; only a small 1x1 fully convolutional head is trained. Outliers: the shared "
          "DRAEM-style Perlin/texture anomalies (engine.components.synthetic_anomalies), generated once per fit "
          "(`outliers_per_image` per training image) instead of fresh confetti noise each batch; labelled "
          "anomalies passed to fit are added as extra outliers. Image-level (unsupervised) FCDD loss. Heatmap "
          "upsampling: bilinear + Gaussian blur (σ = `sigma`) rather than the transposed Gaussian kernel. "
          "Image score: mean of the heatmap as in the paper (`score='max'` also offered).",
    presets={"test": {"epochs": 15, "outliers_per_image": 1},
             "fast": {"max_steps": 150, "epochs": 30, "outliers_per_image": 2},
             "quality": {"max_steps": 600, "epochs": 100, "outliers_per_image": 4}},
)
class FCDD(BaseDetector):
    """FCDD on cached backbone features; trained with the pseudo-Huber one-class loss against synthetic outliers."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), hidden: int = 128, epochs: int = 30,
                 lr: float = 1e-3, batch_size: int = 8, outliers_per_image: int = 2, score: str = "mean",
                 sigma: float = 4.0, max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.outliers_per_image = outliers_per_image
        self.score = score
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    def _features(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        """(N, D, h, w) raw concatenated backbone features at the first layer's resolution."""
        return patch_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                              device=self.device_, progress=progress)

    def _outliers(self, train: ImageSet) -> ImageSet:
        """`outliers_per_image` synthetic anomalous copies of every training image (seeded)."""
        x = train.float_images().repeat(self.outliers_per_image, 1, 1, 1)
        out, _ = make_anomalies(x, self.generator_, p=1.0)
        return ImageSet(images=(out * 255.0).round().to(torch.uint8), labels=torch.ones(len(out), dtype=torch.int64))

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if self.score not in ("mean", "max"):
            raise ValueError("score must be 'mean' or 'max'")
        normal = self._features(train, progress)
        self.f_mean_ = normal.mean((0, 2, 3), keepdim=True)
        self.f_std_ = normal.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        parts = [normal]
        if self.outliers_per_image > 0:
            parts.append(self._features(self._outliers(train)))
        if anomalies is not None and len(anomalies):
            parts.append(self._features(anomalies))
        x = (torch.cat(parts) - self.f_mean_) / self.f_std_
        y = torch.cat([torch.zeros(len(normal)), torch.ones(len(x) - len(normal))])
        if y.sum() == 0:
            raise ValueError("FCDD needs outliers: set outliers_per_image ≥ 1 or pass anomalies")
        torch.manual_seed(self.seed)  # a feature-cache miss builds the backbone, which draws from the global RNG
        self.head_ = FCDDHead(x.shape[1], self.hidden).to(self.device_)
        head, dev = self.head_, self.device_

        def loss(idx: torch.Tensor) -> torch.Tensor:
            return fcdd_loss(pseudo_huber(head(x[idx].to(dev))), y[idx].to(dev))

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                          patience=self.epochs,
                          seed=self.seed)
        res = train_loop(Objective(head.parameters(), loss, name="fcdd"), len(x), cfg, modules=[head], device=dev,
                         progress=progress)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def heatmaps(self, images: ImageSet) -> torch.Tensor:
        """Pseudo-Huber heatmaps A (N, h, w) at the feature resolution."""
        f = (self._features(images) - self.f_mean_) / self.f_std_
        out = [pseudo_huber(self.head_(f[i:i + 64].to(self.device_))).float().cpu() for i in range(0, len(f), 64)]
        return torch.cat(out)

    def _predict(self, images: ImageSet) -> Prediction:
        a = self.heatmaps(images)
        scores = a.flatten(1).mean(1) if self.score == "mean" else a.flatten(1).amax(1)
        return Prediction(scores=scores, maps=to_pixel_map(a, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return {**module_state("head", self.head_), "f_mean": self.f_mean_, "f_std": self.f_std_}

    def _extra(self) -> dict[str, Any]:
        return {"in_channels": int(self.f_mean_.shape[1])}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.head_ = FCDDHead(int(extra["in_channels"]), self.hidden).to(self.device_)
        load_module_state("head", self.head_, tensors)
        self.head_.eval()
        self.f_mean_, self.f_std_ = tensors["f_mean"], tensors["f_std"]
