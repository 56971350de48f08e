"""MemAE (Gong et al., "Memorizing Normality to Detect Anomaly: Memory-augmented Deep Autoencoder for
Unsupervised Anomaly Detection", ICCV 2019).

The encoder's latent is not passed to the decoder directly: it is used as a query into a learned memory of
M prototype vectors, and the decoder only sees a sparse combination of memory items. Trained on normal
images, the memory holds normal patterns, so a defect is rebuilt from normal prototypes and stands out in the
reconstruction error even when a plain autoencoder would have copied it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.nets import ConvDecoder, ConvEncoder
from engine.methods.autoencoder.autoencoder import ReconstructionDetector
from engine.registry import register


def hard_shrink(w: torch.Tensor, lam: float, eps: float = 1e-12) -> torch.Tensor:
    """MemAE's continuous hard shrinkage (paper Eq. 7): max(w − λ, 0)·w / (|w − λ| + ε).

    Non-negative weights at or below λ become 0, the others stay (up to ε) themselves; differentiable almost
    everywhere so the memory trains through it. Any shape."""
    return F.relu(w - lam) * w / ((w - lam).abs() + eps)


def addressing_entropy(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Entropy −Σ_i ŵ_i log ŵ_i of addressing weights over the last axis: (..., M) -> (...). The training loss
    adds its mean (weighted by α) to push every query towards few memory items."""
    return -(w * torch.log(w + eps)).sum(-1)


class MemoryModule(nn.Module):
    """Memory of `size` items of `dim` channels, addressed by every latent position.

    forward(z: (N, dim, h, w)) -> (ẑ: (N, dim, h, w), ŵ: (N·h·w, size)): each position's query z is compared
    with every item (dot product), softmax, hard-shrunk at `shrink_thres`, L1-renormalised; ẑ = ŵ M.
    """

    def __init__(self, size: int, dim: int, shrink_thres: float):
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.items = nn.Parameter(torch.empty(size, dim).uniform_(-bound, bound))
        self.shrink_thres = shrink_thres

    def address(self, q: torch.Tensor) -> torch.Tensor:
        """Queries (T, dim) -> sparse addressing weights (T, size), rows summing to 1 (or 0 if all shrunk)."""
        w = torch.softmax(q.float() @ self.items.float().T, dim=1)
        if self.shrink_thres > 0:
            w = F.normalize(hard_shrink(w, self.shrink_thres), p=1, dim=1)
        return w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w_ = z.shape
        q = z.permute(0, 2, 3, 1).reshape(-1, c)
        w = self.address(q)
        out = (w @ self.items.float()).to(z.dtype)
        return out.view(n, h, w_, c).permute(0, 3, 1, 2), w


class MemAENet(nn.Module):
    """ConvEncoder -> MemoryModule -> ConvDecoder (sigmoid).

    forward: (N, 3, H, W) -> (reconstruction (N, 3, H, W), addressing weights (N·h·w, memory_size)).
    """

    def __init__(self, widths: tuple[int, ...], latent_channels: int, memory_size: int, shrink_thres: float):
        super().__init__()
        self.encoder = ConvEncoder(3, widths=widths, latent_channels=latent_channels)
        self.memory = MemoryModule(memory_size, latent_channels, shrink_thres)
        self.decoder = ConvDecoder(3, widths=widths, latent_channels=latent_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_hat, w = self.memory(self.encoder(x))
        return self.decoder(z_hat), w


@register(
    family="autoencoder", name="memae", localises=True, trained=True, uses_backbone=False,
    paper="Gong et al., ICCV 2019 (MemAE)",
    summary="Autoencoder whose latent is rebuilt from a learned memory of normal prototypes (sparse "
            "addressing); defects are rebuilt as normal content and show in the reconstruction error.",
    notes="As the paper: every latent position is a query into M memory items (M = 500, the paper's CIFAR "
          "setting), softmax addressing, hard shrinkage with λ = 0.0025 (1.25/M, within the paper's 1/M–3/M) "
          "and L1 renormalisation, loss = MSE + α·mean addressing entropy with α = 0.0002. Addressing uses the dot "
          "product as the authors' released code (the paper writes cosine similarity). Encoder/decoder are this "
          "lab's small strided-conv nets (widths 16–64, latent 64 channels at size/16) trained from scratch at "
          "`size` px (default 128; maps upsampled) with seeded flips, AdamW with a step cap instead of the "
          "paper's schedule (reduced on CPU). Map = |x − x̂| averaged over channels, Gaussian σ = 2 px; score = "
          "mean of the top 1% of the map (the paper scores the whole-image error; `top_k=1` gives that).",
    faithful=True,
    presets={"test": {"epochs": 30}, "fast": {"max_steps": 300, "epochs": 60},
             "quality": {"max_steps": 1200, "epochs": 300}},
)
class MemAE(ReconstructionDetector):
    """Memory-augmented autoencoder; maps are reconstruction residuals."""

    def __init__(self, size: int = 128, widths: tuple[int, ...] = (16, 32, 64, 64), latent_channels: int = 64,
                 memory_size: int = 500, shrink_thres: float = 0.0025, entropy_weight: float = 0.0002,
                 epochs: int = 60, batch_size: int = 8, lr: float = 2e-3, map_ssim_weight: float = 0.0,
                 sigma: float = 2.0, top_k: float = 0.01, max_steps: int | None = None, seed: int = 0):
        self.size = size
        self.widths = tuple(widths)
        self.latent_channels = latent_channels
        self.memory_size = memory_size
        self.shrink_thres = shrink_thres
        self.entropy_weight = entropy_weight
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.map_ssim_weight = map_ssim_weight
        self.sigma = sigma
        self.top_k = top_k
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> MemAENet:
        return MemAENet(self.widths, self.latent_channels, self.memory_size, self.shrink_thres).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        x = self._working(train)
        self.net_ = self._build()

        def loss(idx: torch.Tensor, augment: bool = True) -> torch.Tensor:
            b = x[idx]
            b = (self._flip(b) if augment else b).to(self.device_)
            rec, w = self.net_(b)
            return F.mse_loss(rec, b) + self.entropy_weight * addressing_entropy(w).mean()

        self._train(loss, len(x), progress, val_loss=lambda i: float(loss(i, False)))
        with torch.no_grad():
            _, w = self.net_(x[: min(len(x), 8)].to(self.device_))
        used = (w > 0).sum(1).float()
        self.run_notes_["memory"] = (f"{float(used.mean()):.1f} of {self.memory_size} items per query on average "
                                     f"after shrinkage")

    def _forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.net_(b)[0]

    def _predict(self, images: ImageSet) -> Prediction:
        return self._residual_prediction(images, self._forward)
