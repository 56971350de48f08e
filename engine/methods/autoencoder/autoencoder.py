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

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import gaussian_blur
from engine.components.nets import ssim_map
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.device import batch_size
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


class ReconstructionDetector(BaseDetector):
    """Shared helpers of the reconstruction family. Subclasses set `size`, `sigma`, `map_ssim_weight`,
    `top_k`, `epochs`, `max_steps`, `batch_size`, `lr`, `seed`."""

    square_input = True  # _working resizes to size x size

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


class SSIMAutoencoder(nn.Module):
    """The paper's convolutional autoencoder (Bergmann et al. 2019, Table 1) for P x P patches (P = 128):

    encoder  Conv 4x4/2 32, Conv 4x4/2 32, Conv 3x3 32, Conv 4x4/2 64, Conv 3x3 64, Conv 4x4/2 128, Conv 3x3 64,
             Conv 3x3 32, Conv (P/16)x(P/16) valid to `latent_dim` (1x1: the d = 100 latent vector);
    decoder  the mirror with transposed convolutions. LeakyReLU(0.2) after every layer except the last of the
             encoder and of the decoder (linear). `width` scales the channel counts (1 = the paper's).
    (N, 3, P, P) -> (N, 3, P, P); the latent is (N, latent_dim, 1, 1) ((N, 2 latent_dim, 1, 1) when
    `variational`: the VAE reads μ and log σ² from it and forward() is not used).
    """

    # (out channels, kernel, stride, padding) of the encoder; the decoder mirrors them.
    LAYERS = ((32, 4, 2, 1), (32, 4, 2, 1), (32, 3, 1, 1), (64, 4, 2, 1), (64, 3, 1, 1), (128, 4, 2, 1),
              (64, 3, 1, 1), (32, 3, 1, 1))

    def __init__(self, patch: int = 128, latent_dim: int = 100, width: float = 1.0, channels: int = 3,
                 variational: bool = False):
        super().__init__()
        if patch % 16:
            raise ValueError(f"patch must be divisible by 16, got {patch}")
        outs = [max(4, round(c * width)) for c, *_ in self.LAYERS]
        enc: list[nn.Module] = []
        c_in = channels
        for c_out, (_, k, st, pad) in zip(outs, self.LAYERS, strict=True):
            enc += [nn.Conv2d(c_in, c_out, k, st, pad), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        # a VAE's encoder outputs μ and log σ² (2 x latent_dim)
        enc.append(nn.Conv2d(c_in, 2 * latent_dim if variational else latent_dim, patch // 16))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, c_in, patch // 16), nn.LeakyReLU(0.2, inplace=True)]
        ins = [channels, *outs[:-1]]
        for i in reversed(range(len(self.LAYERS))):
            _, k, st, pad = self.LAYERS[i]
            c_out = ins[i]
            conv = nn.ConvTranspose2d(outs[i], c_out, k, st, pad) if st > 1 else nn.Conv2d(outs[i], c_out, k, st, pad)
            dec.append(conv)
            if i > 0:
                dec.append(nn.LeakyReLU(0.2, inplace=True))
        self.decoder = nn.Sequential(*dec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def window_starts(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets of sliding windows of `patch` px at `stride` covering [0, size), the last one flush with
    the border."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


@register(
    family="autoencoder", name="autoencoder", localises=True, trained=True, cpu_bf16=True, uses_backbone=False,
    paper="Bergmann et al., VISAPP 2019 (SSIM autoencoder)",
    summary="Convolutional autoencoder trained from scratch on random patches of normal images with the SSIM "
            "loss (or L2); anomalies are where the reconstruction is structurally dissimilar.",
    notes="Follows the paper: its Table 1 architecture (4x4/3x3 convs of 32-128 channels, a d = 100 latent "
          "vector, mirrored decoder, LeakyReLU 0.2, linear outputs), SSIM loss with an 11 px Gaussian window "
          "(`loss='l2'` is the paper's L2 variant), training on random 128 px patches (Adam lr 2e-4, weight decay "
          "1e-5, batch 128, 200 epochs of 10 000 patches in quality), residual map 1 − SSIM (or the squared error "
          "for L2) from 128 px sliding windows (stride 32, overlapping maps averaged), image score = the map's "
          "maximum. Images are resized to `size` = 256 px (the MVTec AD evaluation zooms textures to 512 px). "
          "Colour images keep their 3 channels (the paper's woven textures were grey). fast (reduced): images at "
          "128 px, 64 px windows at stride 16 (the same architecture, its last conv 4x4), half-width channels, "
          "300 steps of 16 patches at lr 2e-3, and the map smoothed with a Gaussian of σ = 2 px (without it the "
          "max score is noisy: sample brick image AUROC 0.79 without, 0.93 with, test preset).",
    presets={"test": {"size": 128, "patch": 64, "stride": 16, "sigma": 2.0, "width": 0.5, "batch_size": 8,
                      "epochs": 400, "max_steps": 150, "lr": 2e-3},
             "fast": {"size": 128, "patch": 64, "stride": 16, "sigma": 2.0, "width": 0.5, "batch_size": 16,
                      "epochs": 400, "max_steps": 300, "lr": 2e-3},
             "quality": {}},
    reduced_presets=("test", "fast"),
)
class Autoencoder(ReconstructionDetector):
    """SSIM autoencoder (Bergmann et al. 2019): maps are 1 − SSIM (or squared error) of sliding-window
    reconstructions. Defaults are the paper's configuration."""

    def __init__(self, size: int = 256, patch: int = 128, latent_dim: int = 100, width: float = 1.0,
                 loss: str = "ssim", epochs: int = 15625, batch_size: int = 128, lr: float = 2e-4,
                 weight_decay: float = 1e-5, stride: int = 32, sigma: float = 0.0, top_k: float = 0.0,
                 max_steps: int | None = 200 * 10_000 // 128, seed: int = 0):
        self.size = size
        self.patch = patch
        self.latent_dim = latent_dim
        self.width = width
        self.loss = loss
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.stride = stride
        self.sigma = sigma
        self.top_k = top_k
        self.max_steps = max_steps
        self.seed = seed

    def _check(self) -> None:
        if self.loss not in ("ssim", "l2"):
            raise ConfigError(f"autoencoder: loss must be 'ssim' (the paper's) or 'l2', not {self.loss!r}")
        if self.patch % 16 or not 16 <= self.patch <= self.size:
            raise ConfigError(f"autoencoder: patch must be a multiple of 16 between 16 and size ({self.size}), "
                              f"got {self.patch}")
        if self.stride < 1:
            raise ConfigError(f"autoencoder: stride must be ≥ 1, got {self.stride}")

    def _build(self) -> SSIMAutoencoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return SSIMAutoencoder(self.patch, self.latent_dim, self.width).to(self.device_)

    def residual(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Per-pixel residual (N, 3, P, P) x2 -> (N, P, P): 1 − SSIM (loss 'ssim') or the squared error averaged
        over channels ('l2')."""
        if self.loss == "ssim":
            return 1 - ssim_map(x, rec)
        return (x - rec).pow(2).mean(1)

    def training_loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """The paper's loss on a batch of patches: mean (1 − SSIM) or mean squared error. Scalar."""
        return self.residual(x, rec).mean()

    def _random_patches(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """One random `patch` px crop of each image x[idx]: (B, 3, P, P)."""
        p = self.patch
        r = torch.randint(0, self.size - p + 1, (len(idx), 2), generator=self.generator_)
        return torch.stack([x[int(i), :, a:a + p, b:b + p] for i, (a, b) in zip(idx.tolist(), r.tolist(), strict=True)])

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        self._check()
        x = self._working(train)
        self.net_ = self._build()
        n = len(x)
        # Items of the loop are patches: image k % n, a fresh random crop each time it is drawn.
        n_items = max(n, self.batch_size * 4)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            b = self._random_patches(x, idx % n).to(self.device_)
            return self.training_loss(b, self.net_(b))

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                          val_fraction=0.0, grad_clip=None, seed=self.seed)
        res = train_loop(Objective(self.net_.parameters(), loss), n_items, cfg, modules=[self.net_],
                         device=self.device_, progress=progress)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary(),
                           "resolution": f"{self.size} px images, {self.patch} px windows at stride {self.stride}"}

    def residual_map(self, x: torch.Tensor) -> torch.Tensor:
        """Sliding-window residuals of images (N, 3, S, S) -> (N, S, S), overlapping windows averaged."""
        p = self.patch
        starts = window_starts(self.size, p, self.stride)
        total = torch.zeros(x.shape[0], self.size, self.size)
        count = torch.zeros(1, self.size, self.size)
        self.net_.eval()
        for a in starts:
            for b in starts:
                win = x[:, :, a:a + p, b:b + p]
                res = torch.cat(self._batched(win, lambda w: self.residual(w, self.net_(w).float()).cpu()))
                total[:, a:a + p, b:b + p] += res
                count[:, a:a + p, b:b + p] += 1
        return total / count

    def _predict(self, images: ImageSet) -> Prediction:
        maps = gaussian_blur(self.residual_map(self._working(images)), self.sigma * self.size / 128)
        return Prediction(scores=self._score(maps), maps=maps)
