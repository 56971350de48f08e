"""Variational autoencoder (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014) for anomaly
detection as the survey describes it: an image is anomalous when it is poorly reconstructed and when its
latent code deviates from the prior, i.e. when its negative evidence lower bound is high.

Network: the convolutional encoder/decoder of the SSIM autoencoder (Bergmann et al. 2019, Table 1; cited as
the standard architecture) on whole images, the encoder's last layer giving μ and log σ² of a d = 100
Gaussian latent. Loss per image: −ELBO = Σ_pixels (x − x̂)² + β · KL(q(z|x) ‖ N(0, I)), β = 1 (a Gaussian
decoder of fixed variance); optimised per pixel (divided by the pixel count). Score: the same −ELBO with x̂
decoded from μ; map: the per-pixel squared error.
"""

from __future__ import annotations

import torch

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.autoencoder.autoencoder import ReconstructionDetector, SSIMAutoencoder
from engine.registry import register


def kl_to_prior(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) summed over the latent dimensions: (N, d, ...) x2 -> (N,)."""
    return 0.5 * (mu * mu + logvar.exp() - 1 - logvar).flatten(1).sum(1)


@register(
    family="autoencoder", name="vae", localises=True, trained=True, uses_backbone=False,
    paper="Kingma & Welling, ICLR 2014 (VAE); network of Bergmann et al., VISAPP 2019; scoring as in the survey",
    summary="Variational autoencoder trained on normal images; score = −ELBO: reconstruction error plus how far "
            "the latent code is from the prior (KL).",
    notes="Kingma & Welling's VAE (Gaussian latent, reparameterisation, loss = −ELBO with a fixed-variance Gaussian "
          "decoder: squared error summed over pixels + KL to N(0, I), β = 1) on the SSIM autoencoder's "
          "convolutional network (Bergmann et al. 2019, Table 1, d = 100; the VAE paper has no image network), "
          "whole images resized to `size` = 128 px, Adam lr 2e-4. Score = the image's −ELBO with x̂ decoded from "
          "μ (reconstruction error + the latent's KL deviation from the prior, as the survey describes); map = "
          "per-pixel squared error. The loss is divided by the pixel count for the optimiser (same minimiser). "
          "fast (reduced): half-width channels and a few hundred steps at lr 2e-3.",
    presets={"test": {"width": 0.5, "batch_size": 8, "max_steps": 150, "lr": 2e-3},
             "fast": {"width": 0.5, "batch_size": 16, "max_steps": 300, "lr": 2e-3},
             "quality": {}},
    reduced_presets=("test", "fast"),
)
class VAE(ReconstructionDetector):
    """VAE scored by its negative ELBO (see the module docstring). Defaults are the full configuration."""

    def __init__(self, size: int = 128, latent_dim: int = 100, width: float = 1.0, beta: float = 1.0,
                 epochs: int = 1000, batch_size: int = 32, lr: float = 2e-4, sigma: float = 0.0,
                 max_steps: int | None = 5000, seed: int = 0):
        self.size = size
        self.latent_dim = latent_dim
        self.width = width
        self.beta = beta
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> SSIMAutoencoder:
        if self.size % 16 or self.size < 16:
            raise ConfigError(f"vae: size must be a multiple of 16 (≥ 16), got {self.size}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return SSIMAutoencoder(self.size, self.latent_dim, self.width, variational=True).to(self.device_)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, S, S) -> μ, log σ² (N, d, 1, 1); log σ² clamped to [−10, 10] for stability."""
        mu, logvar = self.net_.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 10)

    def neg_elbo(self, x: torch.Tensor, rec: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per image: Σ_pixels (x − x̂)² + β · KL(q(z|x) ‖ N(0, I)). (N,)"""
        return (x - rec).pow(2).flatten(1).sum(1) + self.beta * kl_to_prior(mu, logvar)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._working(train)
        self.net_ = self._build()
        n_pix = x[0].numel()

        def loss(idx: torch.Tensor, sample: bool = True) -> torch.Tensor:
            b = x[idx]
            b = (self._flip(b) if sample else b).to(self.device_)
            mu, logvar = self.posterior(b)
            if sample:  # reparameterisation with the run's generator (CPU), so runs repeat exactly
                eps = torch.randn(mu.shape, generator=self.generator_).to(mu.device, mu.dtype)
                z = mu + (0.5 * logvar).exp() * eps
            else:
                z = mu
            return self.neg_elbo(b, self.net_.decoder(z), mu, logvar).mean() / n_pix

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, lr=self.lr, weight_decay=0.0, seed=self.seed,
                          patience=max(5, self.epochs // 4))
        res = train_loop(Objective(self.net_.parameters(), loss), len(x), cfg, modules=[self.net_],
                         device=self.device_, progress=progress, val_loss=lambda i: float(loss(i, False)))
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _forward(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) -> (per-pixel squared error (B, S, S), −ELBO (B,)), decoding μ."""
        mu, logvar = self.posterior(b)
        rec = self.net_.decoder(mu).float()
        return (b - rec).pow(2).mean(1).cpu(), self.neg_elbo(b, rec, mu.float(), logvar.float()).cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        self.net_.eval()
        parts = self._batched(self._working(images), self._forward)
        maps = gaussian_blur(torch.cat([p[0] for p in parts]), self.sigma * self.size / 128)
        return Prediction(scores=torch.cat([p[1] for p in parts]), maps=maps)
