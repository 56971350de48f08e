"""DFR (Shi, Yang & Qi, "Unsupervised anomaly segmentation via deep feature reconstruction", Neurocomputing 2021).

Reconstruction at the feature level: a pretrained CNN's feature maps at several depths are resized to one
grid and stacked into a *multi-scale regional feature* per cell; a convolutional autoencoder made only of
1×1 convolutions learns to rebuild those vectors on normal images. Where it cannot (the regional feature is
unlike any it was trained on), the cell is anomalous.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress, no_progress
from engine.components.anomaly_map import resample_cells, to_pixel_map
from engine.components.features import extract_features
from engine.methods.autoencoder.autoencoder import ReconstructionDetector
from engine.methods.base import load_module_state
from engine.registry import register


def regional_features(feats: list[torch.Tensor], image_size: tuple[int, int], stride: int) -> torch.Tensor:
    """DFR's multi-scale regional feature generator.

    feats: per-layer maps (N, C_l, h_l, w_l) of one batch of images of `image_size` (H, W). Each map is
    resized to (H, W) (cells kept over the pixels they see), averaged over non-overlapping stride×stride
    windows and the layers are stacked: -> (N, ΣC_l, H // stride, W // stride).
    """
    out = []
    for f in feats:
        up = resample_cells(f.float(), image_size)
        out.append(F.avg_pool2d(up, stride, stride) if stride > 1 else up)
    return torch.cat(out, 1)


def pca_latent_dim(x: torch.Tensor, variance: float) -> int:
    """The number of principal components that explain at least `variance` of the variance of rows of
    x (M, C) — DFR's rule for the autoencoder's latent width (the paper keeps 90%)."""
    if not 0 < variance <= 1:
        raise ConfigError(f"dfr.pca_variance must be in (0, 1], got {variance}")
    xc = x.double() - x.double().mean(0, keepdim=True)
    ev = torch.linalg.eigvalsh(xc.T @ xc / max(1, x.shape[0] - 1)).flip(0).clamp_min(0)
    ratio = ev.cumsum(0) / ev.sum().clamp_min(1e-12)
    return int(min(x.shape[1], int((ratio < variance - 1e-9).sum()) + 1))


class FeatureCAE(nn.Module):
    """DFR's 1×1 convolutional autoencoder: C -> (C+2d)/2 -> 2d -> d -> 2d -> (C+2d)/2 -> C channels,
    BatchNorm + ReLU after every hidden layer, linear at the latent and output. (N, C, h, w) -> same shape;
    every cell is encoded independently of its neighbours."""

    def __init__(self, in_channels: int, latent_dim: int):
        super().__init__()
        mid = (in_channels + 2 * latent_dim) // 2

        def hidden(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 1), nn.BatchNorm2d(b), nn.ReLU(inplace=True)]

        self.encoder = nn.Sequential(*hidden(in_channels, mid), *hidden(mid, 2 * latent_dim),
                                     nn.Conv2d(2 * latent_dim, latent_dim, 1))
        self.decoder = nn.Sequential(*hidden(latent_dim, 2 * latent_dim), *hidden(2 * latent_dim, mid),
                                     nn.Conv2d(mid, in_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register(
    family="autoencoder", name="dfr", localises=True, trained=True, cpu_bf16=True, uses_backbone=True,
    paper="Shi, Yang & Qi, Neurocomputing 2021 (DFR)",
    summary="Rebuilds multi-scale pretrained feature maps with a 1×1 convolutional autoencoder; anomalies are "
            "the cells whose features it cannot rebuild.",
    notes="EfficientNet-Lite0 (bundled ImageNet weights) stands in for VGG19 (offline): stages blocks.0/1/2/4 "
          "(strides 2–16, 192 channels) instead of relu1_1–relu4_4 (12 layers, strides 1–8). As the paper: each "
          "map is resized to the image size, averaged over non-overlapping 4×4 windows and stacked (regional "
          "features at stride 4); the latent width is the number of principal components keeping 90% of the "
          "variance of the first 10 training images' features; the autoencoder is the paper's 1×1-conv CAE "
          "with BatchNorm, trained with MSE; map = mean over channels of the squared error, upsampled. "
          "Differences: AdamW at lr 1e-3 with a step cap from the shared train loop instead of Adam 1e-4 for "
          "150–700 epochs (reduced on CPU), early stopping on a held-out slice; Gaussian smoothing σ = `sigma` "
          "px (default 4, as PatchCore here; the paper has none); image score = max of the map.",
    faithful=True,
    presets={"test": {"epochs": 30, "max_steps": 120},
             "fast": {"epochs": 100, "max_steps": 300},
             "quality": {"epochs": 700, "max_steps": 2000}},
)
class DFR(ReconstructionDetector):
    """Deep feature reconstruction: regional features -> 1×1 CAE -> per-cell squared error."""

    square_input = False  # works on backbone features of any shape

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.0", "blocks.1", "blocks.2", "blocks.4"), stride: int = 4,
                 latent_dim: int | None = None, pca_variance: float = 0.9, pca_images: int = 10,
                 epochs: int = 100, batch_size: int = 4, lr: float = 1e-3, sigma: float = 4.0,
                 max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.stride = stride
        self.latent_dim = latent_dim
        self.pca_variance = pca_variance
        self.pca_images = pca_images
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    def _regional(self, images: ImageSet, progress: Progress = no_progress) -> torch.Tensor:
        """(N, ΣC, H / stride, W / stride) regional features of `images` (backbone maps from the shared cache)."""
        if self.stride < 1 or images.size[0] < self.stride or images.size[1] < self.stride:
            raise ConfigError(f"dfr.stride must be between 1 and the image size {images.size}, got {self.stride}")
        feats = extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                 device=self.device_, progress=progress)
        chunk = 16  # the full-resolution intermediate is (chunk, C_l, H, W)
        return torch.cat([regional_features([f[i:i + chunk] for f in feats], images.size, self.stride)
                          for i in range(0, len(images), chunk)])

    def _build(self) -> FeatureCAE:
        return FeatureCAE(self.in_channels_, self.latent_dim_).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._regional(train, progress)
        self.in_channels_ = int(x.shape[1])
        if self.latent_dim is not None:
            if not 0 < self.latent_dim <= self.in_channels_:
                raise ConfigError(f"dfr.latent_dim must be in 1..{self.in_channels_}, got {self.latent_dim}")
            self.latent_dim_ = int(self.latent_dim)
        else:
            sample = x[: max(1, self.pca_images)]
            self.latent_dim_ = pca_latent_dim(sample.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), self.pca_variance)
        self.net_ = self._build()

        def loss(idx: torch.Tensor) -> torch.Tensor:
            b = x[idx].to(self.device_)
            return F.mse_loss(self.net_(b), b)

        self._train(loss, len(x), progress, val_loss=lambda i: float(loss(i)))
        self.run_notes_["latent_dim"] = self.latent_dim_

    def _cell_errors(self, b: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) regional features -> (B, h, w) mean squared reconstruction error per cell."""
        return ((self.net_(b) - b) ** 2).mean(1).float().cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        err = torch.cat(self._batched(self._regional(images), self._cell_errors))
        maps = to_pixel_map(err, images.size, self.sigma)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def _extra(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels_, "latent_dim": self.latent_dim_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.in_channels_ = int(extra["in_channels"])
        self.latent_dim_ = int(extra["latent_dim"])
        self.net_ = self._build()
        load_module_state("net", self.net_, tensors)
        self.net_.eval()
