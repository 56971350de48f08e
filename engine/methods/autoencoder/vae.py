"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014) for anomaly
detection as the survey describes it: reconstruction error plus the latent's deviation from the prior."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.nets import ConvDecoder, ConvEncoder, ssim_map
from engine.methods.autoencoder.autoencoder import ReconstructionDetector
from engine.registry import register


class ConvVAE(nn.Module):
    """Gaussian VAE with a spatial latent: encoder -> (μ, log σ²) each (N, z, h, w); decoder(z) -> (N, 3, H, W)."""

    def __init__(self, widths: tuple[int, ...], z_channels: int):
        super().__init__()
        self.encoder = ConvEncoder(3, widths=widths, latent_channels=2 * z_channels)
        self.decoder = ConvDecoder(3, widths=widths, latent_channels=z_channels)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) -> μ, log σ² (N, z, H/2^d, W/2^d); log σ² clamped to [-10, 10] for stability."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    @staticmethod
    def kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per latent element: (N, z, h, w)."""
        return 0.5 * (mu * mu + logvar.exp() - 1 - logvar)


@register(
    family="autoencoder", name="vae", localises=True, trained=True, uses_backbone=False,
    paper="Kingma & Welling, ICLR 2014 (VAE); anomaly scoring as in the survey's reconstruction family",
    summary="Variational autoencoder trained on normal images; score = reconstruction error + how far the "
            "latent code is from the prior (KL).",
    notes="Trained from scratch at `size` px (default 128; maps upsampled back) with seeded flips. The latent "
          "is a spatial map (size/16 x size/16 x z_channels, a factorised Gaussian per element) rather than a "
          "single vector, which keeps local detail on texture images. Loss = MSE + ssim_loss_weight·(1 − SSIM) "
          "+ kl_weight·mean KL (a β-VAE weighting; mean-reduced, so kl_weight is per element). Map: error of "
          "decoding the posterior mean μ, (1 − w)·|x − x̂| + w·(1 − SSIM)/2 with w = map_ssim_weight = 0 by "
          "default (SSIM in the map hurt on textures), smoothed σ = 2 px. Score = mean of the top 1% map "
          "pixels + kl_score_weight · mean KL per latent element, kl_score_weight = 0.003: on the sample "
          "brick the KL term alone ranks images at chance (AUROC ≈ 0.5) and larger weights lower the AUROC "
          "(0.84 at 0.003, 0.67 at 0.1), so it is kept small.",
    faithful=False,
    presets={"test": {"epochs": 30}, "fast": {"max_steps": 300, "epochs": 60},
             "quality": {"max_steps": 1200, "epochs": 300}},
)
class VAE(ReconstructionDetector):
    """VAE: map from the posterior-mean reconstruction, score adds the KL deviation from the prior."""

    def __init__(self, size: int = 128, widths: tuple[int, ...] = (16, 32, 64, 64), z_channels: int = 4,
                 epochs: int = 60, batch_size: int = 8, lr: float = 2e-3, kl_weight: float = 1e-3,
                 ssim_loss_weight: float = 1.0, map_ssim_weight: float = 0.0, sigma: float = 2.0,
                 top_k: float = 0.01, kl_score_weight: float = 0.003, max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.widths = tuple(widths)
        self.z_channels = z_channels
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.kl_weight = kl_weight
        self.ssim_loss_weight = ssim_loss_weight
        self.map_ssim_weight = map_ssim_weight
        self.sigma = sigma
        self.top_k = top_k
        self.kl_score_weight = kl_score_weight
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> ConvVAE:
        return ConvVAE(self.widths, self.z_channels).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._working(train)
        self.net_ = self._build()

        def loss(idx: torch.Tensor, sample: bool = True) -> torch.Tensor:
            b = x[idx]
            b = (self._flip(b) if sample else b).to(self.device_)
            mu, logvar = self.net_.posterior(b)
            if sample:  # reparameterisation with the run's generator (CPU), so runs repeat exactly
                eps = torch.randn(mu.shape, generator=self.generator_).to(mu.device, mu.dtype)
                z = mu + (0.5 * logvar).exp() * eps
            else:
                z = mu
            rec = self.net_.decoder(z)
            return (F.mse_loss(rec, b) + self.ssim_loss_weight * (1 - ssim_map(rec, b).mean())
                    + self.kl_weight * self.net_.kl(mu, logvar).mean())

        self._train(loss, len(x), progress, val_loss=lambda i: float(loss(i, False)))

    def _forward(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net_.posterior(b)
        return self.net_.decoder(mu).float().cpu(), self.net_.kl(mu, logvar).flatten(1).mean(1).float().cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._working(images)
        parts = self._batched(x, self._forward)
        rec = torch.cat([p[0] for p in parts])
        kl = torch.cat([p[1] for p in parts])
        maps = self._error_map(x, rec)
        return Prediction(scores=self._score(maps) + self.kl_score_weight * kl, maps=maps)
