"""Convolutional autoencoder with an SSIM loss (Bergmann et al., "Improving Unsupervised Defect Segmentation
by Applying Structural Similarity to Autoencoders", VISAPP 2019).

Also holds `ReconstructionDetector`, the part shared by the reconstruction family (AE, VAE, DRAEM, MemAE, skip AE;
DFR uses its training, batching and save/load only):
resizing to a working resolution, seeded flip augmentation, and reconstruction-error maps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur
from engine.components.nets import ConvDecoder, ConvEncoder, ssim_map
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.device import batch_size
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


class ReconstructionDetector(BaseDetector):
    """Shared helpers of the reconstruction family. Subclasses set `size`, `sigma`, `map_ssim_weight`,
    `top_k`, `epochs`, `max_steps`, `batch_size`, `lr`, `seed`."""

    size: int
    sigma: float
    map_ssim_weight: float
    top_k: float
    epochs: int
    max_steps: int | None
    batch_size: int
    lr: float
    seed: int
    net_: nn.Module

    def _working(self, images: ImageSet) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, size, size) float32 in [0, 1] on the CPU (bilinear, antialiased)."""
        x = images.float_images()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size).clamp(0, 1)
        return x

    def _flip(self, x: torch.Tensor) -> torch.Tensor:
        """Seeded random horizontal / vertical flips of a training batch (N, 3, h, w)."""
        n = x.shape[0]
        h = torch.rand(n, generator=self.generator_) < 0.5
        v = torch.rand(n, generator=self.generator_) < 0.5
        x = torch.where(h[:, None, None, None], x.flip(-1), x)
        return torch.where(v[:, None, None, None], x.flip(-2), x)

    def _train(self, loss: Callable[[torch.Tensor], torch.Tensor], n_items: int, progress: Progress,
               val_loss: Callable[[torch.Tensor], float]) -> None:
        """Train `net_` on `loss(idx)` with the shared loop and the subclass's epochs/steps; note how it went."""
        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                          seed=self.seed, patience=max(5, self.epochs // 4))
        res = train_loop(Objective(self.net_.parameters(), loss), n_items, cfg, modules=[self.net_],
                         device=self.device_, progress=progress, val_loss=val_loss)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _error_map(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Blend of per-pixel error and structural dissimilarity, smoothed: (N, 3, h, w) x2 -> (N, h, w).

        map = (1 − w) · mean_c |x − x̂| + w · (1 − SSIM(x, x̂)) / 2, w = map_ssim_weight; both terms lie in
        [0, 1]. Then a Gaussian blur of σ = sigma working pixels.
        """
        err = (x - rec).abs().mean(1)
        dssim = (1 - ssim_map(x, rec)) / 2
        m = (1 - self.map_ssim_weight) * err + self.map_ssim_weight * dssim
        return gaussian_blur(m, self.sigma * self.size / 128)

    def _score(self, maps: torch.Tensor) -> torch.Tensor:
        """Image score: the mean of the top `top_k` fraction of the map's pixels (top_k=0: the max). (N,)"""
        flat = maps.flatten(1)
        k = max(1, int(round(self.top_k * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)

    def _build(self) -> nn.Module:
        """A fresh network on self.device_ (the learned state is `net_`)."""
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        return module_state("net", self.net_)

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.net_ = self._build()
        load_module_state("net", self.net_, tensors)
        self.net_.eval()

    def _residual_prediction(self, images: ImageSet, forward: Callable[[torch.Tensor], torch.Tensor]) -> Prediction:
        """Images -> working resolution -> `forward` in batches (reconstructions (B, 3, size, size)) -> error
        maps (N, size, size) and top-k scores (N,)."""
        x = self._working(images)
        maps = self._error_map(x, torch.cat(self._batched(x, forward)).float().cpu())
        return Prediction(scores=self._score(maps), maps=maps)

    def _batched(self, x: torch.Tensor, fn: Any) -> list[Any]:
        bs = batch_size(self.device_, cpu=16, cuda=64)
        return [fn(x[i:i + bs].to(self.device_)) for i in range(0, len(x), bs)]


class ConvAE(nn.Module):
    """ConvEncoder -> ConvDecoder (sigmoid): (N, 3, H, W) -> (N, 3, H, W)."""

    def __init__(self, widths: tuple[int, ...], latent: str, latent_channels: int, latent_dim: int, size: int):
        super().__init__()
        kw = dict(widths=widths, latent=latent, latent_channels=latent_channels, latent_dim=latent_dim,
                  image_size=size)
        self.encoder = ConvEncoder(3, **kw)
        self.decoder = ConvDecoder(3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@register(
    family="autoencoder", name="autoencoder", localises=True, trained=True, uses_backbone=False,
    paper="Bergmann et al., VISAPP 2019 (SSIM autoencoder)",
    summary="Convolutional autoencoder trained from scratch on normal images (L2 + SSIM loss); "
            "anomalies are what it cannot reconstruct.",
    notes="Trained from scratch at a working resolution of `size` px (default 128; inputs are resized, maps "
          "upsampled back) with seeded flips. Loss = MSE + ssim_loss_weight·(1 − mean SSIM) (the paper uses "
          "SSIM alone or L2 alone). Bottleneck: a narrow spatial latent map (size/16, `latent_channels` "
          "channels) instead of the paper's 100-d vector, which on 20-image texture sets only learns a "
          "blurred mean. Map = (1 − w)·|x − x̂| + w·(1 − SSIM)/2, Gaussian σ = 2 px at 128 px; the blend "
          "weight w = map_ssim_weight defaults to 0 (per-pixel error only): on the sample textures the SSIM "
          "term made maps worse (pixel AUROC 0.947 at w = 0, 0.895 at w = 0.5), so SSIM is used in the loss "
          "only unless w is raised. Score = mean of the top 1% map pixels (a robust max). Whole images, not "
          "the paper's sliding patches.",
    faithful=False,
    presets={"test": {"epochs": 30}, "fast": {"max_steps": 300, "epochs": 60},
             "quality": {"max_steps": 1200, "epochs": 300}},
)
class Autoencoder(ReconstructionDetector):
    """SSIM autoencoder: maps are reconstruction residuals (per-pixel error blended with 1 − SSIM)."""

    def __init__(self, size: int = 128, widths: tuple[int, ...] = (16, 32, 64, 64), latent: str = "map",
                 latent_channels: int = 4, latent_dim: int = 100, epochs: int = 60, batch_size: int = 8,
                 lr: float = 2e-3, ssim_loss_weight: float = 1.0, map_ssim_weight: float = 0.0, sigma: float = 2.0,
                 top_k: float = 0.01, max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.widths = tuple(widths)
        self.latent = latent
        self.latent_channels = latent_channels
        self.latent_dim = latent_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.ssim_loss_weight = ssim_loss_weight
        self.map_ssim_weight = map_ssim_weight
        self.sigma = sigma
        self.top_k = top_k
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> ConvAE:
        return ConvAE(self.widths, self.latent, self.latent_channels, self.latent_dim, self.size).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._working(train)
        self.net_ = self._build()

        def loss(idx: torch.Tensor, augment: bool = True) -> torch.Tensor:
            b = x[idx]
            b = (self._flip(b) if augment else b).to(self.device_)
            rec = self.net_(b)
            return F.mse_loss(rec, b) + self.ssim_loss_weight * (1 - ssim_map(rec, b).mean())

        self._train(loss, len(x), progress, val_loss=lambda i: float(loss(i, False)))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, size, size) in [0, 1] -> reconstructions of the same shape (eval mode)."""
        return torch.cat(self._batched(x, self.net_)).float().cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        return self._residual_prediction(images, self.net_)
