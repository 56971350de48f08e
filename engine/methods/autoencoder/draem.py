"""DRAEM (Zavrtanik et al., "DRAEM – A discriminatively trained reconstruction embedding for surface anomaly
detection", ICCV 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur
from engine.components.nets import UNet, ssim_map
from engine.components.synthetic_anomalies import make_anomalies
from engine.methods.autoencoder.autoencoder import ConvAE, ReconstructionDetector
from engine.registry import register


class DraemNet(nn.Module):
    """Reconstructive sub-network (encoder–decoder) + discriminative sub-network (U-Net on the pair).

    forward: (N, 3, H, W) -> (reconstruction (N, 3, H, W), logits (N, 2, H, W)); channel 1 = anomalous.
    """

    def __init__(self, widths: tuple[int, ...], latent_channels: int, disc_base: int, disc_depth: int):
        super().__init__()
        self.reconstructive = ConvAE(widths, "map", latent_channels, 0, 0)
        self.discriminative = UNet(6, 2, base=disc_base, depth=disc_depth)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.reconstructive(x)
        return rec, self.discriminative(torch.cat([x, rec], 1))


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) of 2-class logits (N, 2, H, W) against a {0,1} mask (N, H, W); mean."""
    logp = F.log_softmax(logits.float(), dim=1)
    logp_t = logp.gather(1, target.long()[:, None])[:, 0]
    return (-(1 - logp_t.exp()).pow(gamma) * logp_t).mean()


@register(
    family="autoencoder", name="draem", localises=True, trained=True, uses_backbone=False,
    paper="Zavrtanik et al., ICCV 2021 (DRAEM)",
    summary="Learns to repair and segment synthetic defects pasted onto normal images: a reconstruction "
            "network plus a discriminative U-Net that compares the image with its repair.",
    notes="Synthetic anomalies: Perlin-noise masks with textures from scikit-image's bundled photographs "
          "(astronaut, coffee, moon, ...; colour/contrast augmented; no DTD download), opacity β ~ U(0, 0.8), "
          "half the training images left clean, as in the paper. Much smaller networks than the paper "
          "(reconstructive widths 16–64 with a spatial bottleneck, discriminative U-Net base 16, depth 3, vs "
          "128/64 channels) and 10–200 epochs instead of 700, so the fast preset trains on 2 CPU cores; "
          "trained at `size` px (default 128; maps upsampled back) with seeded flips. Loss = L2 + (1 − SSIM) "
          "on the reconstruction + focal loss (γ = 2) on the mask, jointly with one AdamW. Map = softmax "
          "anomaly channel, Gaussian σ = 2 px; score = max of the map average-pooled over pool×pool "
          "(pool = 11 at 128 px, the paper's 21 at 256).",
    faithful=False,
    presets={"test": {"epochs": 15}, "fast": {"max_steps": 150, "epochs": 25},
             "quality": {"max_steps": 600, "epochs": 200}},
)
class Draem(ReconstructionDetector):
    """DRAEM: reconstructive + discriminative sub-networks trained on synthetic anomalies."""

    def __init__(self, size: int = 128, widths: tuple[int, ...] = (16, 32, 64, 64), latent_channels: int = 16,
                 disc_base: int = 16, disc_depth: int = 3, epochs: int = 25, batch_size: int = 8, lr: float = 2e-3,
                 anomaly_prob: float = 0.5, focal_gamma: float = 2.0, sigma: float = 2.0, pool: int = 11,
                 max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.widths = tuple(widths)
        self.latent_channels = latent_channels
        self.disc_base = disc_base
        self.disc_depth = disc_depth
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.anomaly_prob = anomaly_prob
        self.focal_gamma = focal_gamma
        self.sigma = sigma
        self.pool = pool
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> DraemNet:
        return DraemNet(self.widths, self.latent_channels, self.disc_base, self.disc_depth).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._working(train)
        self.net_ = self._build()

        def loss(idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
            g = generator or self.generator_
            b = x[idx] if generator is not None else self._flip(x[idx])
            aug, mask = make_anomalies(b, g, p=self.anomaly_prob)
            b, aug, mask = b.to(self.device_), aug.to(self.device_), mask.to(self.device_)
            rec, logits = self.net_(aug)
            return (F.mse_loss(rec, b) + (1 - ssim_map(rec, b).mean())
                    + focal_loss(logits, mask, self.focal_gamma))

        def val_loss(idx: torch.Tensor) -> float:  # the same synthetic anomalies every epoch
            return float(loss(idx, torch.Generator().manual_seed(self.seed + 1)))

        self._train(loss, len(x), progress, val_loss=val_loss)

    def _forward(self, b: torch.Tensor) -> torch.Tensor:
        _, logits = self.net_(b)
        return torch.softmax(logits.float(), dim=1)[:, 1].cpu()

    def _predict(self, images: ImageSet) -> Prediction:
        x = self._working(images)
        maps = gaussian_blur(torch.cat(self._batched(x, self._forward)), self.sigma * self.size / 128)
        pooled = F.avg_pool2d(maps[:, None], self.pool, stride=1, padding=self.pool // 2, count_include_pad=False)
        return Prediction(scores=pooled.flatten(1).amax(1), maps=maps)
