"""CFA (Lee, Lee & Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 2022).

Locally aware pretrained patch features pass through a small trainable *patch descriptor* (a CoordConv 1×1
convolution). A memory bank of normal descriptors is built once with the untrained descriptor (the mean over
the training images at every position, optionally compressed by k-means) and kept fixed; the descriptor is
then trained so every normal patch falls inside a small hypersphere around its K nearest memory entries
(attraction) while staying a margin away from the next J entries (repulsion, hard negatives).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.clustering import kmeans, sq_dists
from engine.components.features import patch_features
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


class CoordDescriptor(nn.Module):
    """CFA's patch descriptor: append x/y coordinate channels in [-1, 1], then a 1×1 convolution.

    (N, C, h, w) -> (N, out_channels, h, w).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack((gx, gy))[None].expand(n, -1, -1, -1)
        return self.conv(torch.cat([x, coords], 1))


def cfa_loss(sorted_d: torch.Tensor, k: int, j: int, r: float, alpha: float, nu: float) -> torch.Tensor:
    """CFA's soft-boundary loss (paper Eqs. 3-5) from each patch's ascending squared distances (T, ≥ K+J).

    L_att = (1/ν) mean over patches and its K nearest entries of max(0, D − r²)
    L_rep = (1/ν) mean over patches and the next J entries (hard negatives) of max(0, r² − D + α).
    Returns L_att + L_rep (a scalar).
    """
    att = torch.relu(sorted_d[:, :k] - r * r).mean()
    rep = torch.relu(r * r - sorted_d[:, k:k + j] + alpha).mean() if j > 0 else sorted_d.new_zeros(())
    return (att + rep) / nu


def softmin_score(sorted_d: torch.Tensor) -> torch.Tensor:
    """CFA's patch score from the ascending K nearest squared distances (T, K): softmin(D)[0] · D[0] -> (T,)."""
    return torch.softmax(-sorted_d, dim=1)[:, 0] * sorted_d[:, 0]


@register(
    family="memory_bank", name="cfa", localises=True, trained=True,
    paper="Lee, Lee & Song, IEEE Access 2022 (CFA)",
    summary="A trainable patch descriptor adapts pretrained features so normal patches fall inside small "
            "hyperspheres around a fixed memory bank (attraction) and away from hard negatives (repulsion).",
    notes="EfficientNet-Lite0 blocks.2+blocks.4 (strides 8/16, 3×3 locally averaged, 152 channels) stand in for "
          "WideResNet-50 layer1-3 (stride 4, 1792 channels): a stride-8 grid keeps the patch-to-bank distance "
          "matrix small on CPU. Descriptor (CoordConv 1×1), memory bank (mean of the untrained descriptor over "
          "the training images per position, optional k-means compression gamma_c), loss constants (K=3, J=3, "
          "r=1e-5, α=0.1, ν=1e-3), softmin score and σ=4 smoothing follow the paper's code. AdamW from the "
          "shared loop instead of AMSGrad. Presets train 5 epochs (at most 60 steps) instead of the paper's 30 "
          "(reduced): on the bundled sample, 30 epochs drifted lower (grass image AUROC 0.979 against 1.000 at "
          "5); 'quality' adds blocks.1 for the paper's stride-4 grid.",
    presets={
        "test": {"epochs": 3},
        "fast": {"epochs": 5, "max_steps": 60},
        "quality": {"epochs": 5, "max_steps": 60, "layers": ("blocks.1", "blocks.2", "blocks.4")},
    },
)
class CFA(BaseDetector):
    """Coupled-hypersphere feature adaptation of a patch memory bank.

    Features (N, C, h, w) -> descriptor (N, D, h, w); per patch, squared distances to the memory (M, D),
    K nearest -> score softmin(D)[0]·D[0]; map: patch scores upsampled and blurred; image score: map maximum.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), gamma_c: int = 1, gamma_d: int = 1,
                 k: int = 3, j: int = 3, r: float = 1e-5, alpha: float = 0.1, nu: float = 1e-3,
                 epochs: int = 30, batch_size: int = 4, lr: float = 1e-3, weight_decay: float = 5e-4,
                 max_steps: int | None = None, sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.gamma_c = gamma_c
        self.gamma_d = gamma_d
        self.k = k
        self.j = j
        self.r = r
        self.alpha = alpha
        self.nu = nu
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.sigma = sigma
        self.seed = seed

    def _features(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        """(N, C, h, w) locally aware (3×3 averaged) features of the chosen stages at the first one's grid."""
        return patch_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                              device=self.device_, patch_size=3, pad="zero", progress=progress)

    def _build(self, channels: int) -> CoordDescriptor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return CoordDescriptor(channels, max(1, channels // self.gamma_d)).to(self.device_)

    def _describe(self, feats: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """Descriptor outputs (N, D, h, w) without gradients, in chunks of images."""
        with torch.no_grad():
            return torch.cat([self.descriptor_(feats[s:s + chunk].to(self.device_)).cpu()
                              for s in range(0, feats.shape[0], chunk)])

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if self.k < 1 or self.j < 0 or self.gamma_c < 1 or self.gamma_d < 1:
            raise ConfigError("cfa needs k ≥ 1, j ≥ 0, gamma_c ≥ 1 and gamma_d ≥ 1")
        feats = self._features(train, progress)
        self.channels_ = int(feats.shape[1])
        self.descriptor_ = self._build(self.channels_)
        # Memory bank: the untrained descriptor's mean over the training images, one entry per position.
        init = self._describe(feats)
        bank = init.mean(0).flatten(1).t().contiguous()  # (h*w, D)
        if self.gamma_c > 1:
            bank = kmeans(bank, max(1, bank.shape[0] // self.gamma_c), seed=self.seed)
        self.memory_bank_ = bank.to(self.device_)
        n_near = min(self.k + self.j, self.memory_bank_.shape[0])

        def loss(idx: torch.Tensor) -> torch.Tensor:
            phi = self.descriptor_(feats[idx].to(self.device_))
            phi = phi.permute(0, 2, 3, 1).reshape(-1, phi.shape[1])
            d = sq_dists(phi, self.memory_bank_).topk(n_near, dim=1, largest=False).values
            return cfa_loss(d, self.k, self.j, self.r, self.alpha, self.nu)

        cfg = TrainConfig(epochs=self.epochs, max_steps=self.max_steps, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, seed=self.seed)
        res = train_loop(Objective(list(self.descriptor_.parameters()), loss), len(train), cfg,
                         modules=[self.descriptor_], device=self.device_, progress=progress)
        self.run_notes_ = {"training": res.summary()}

    def _predict(self, images: ImageSet) -> Prediction:
        phi = self._describe(self._features(images)).to(self.device_)
        n, d, h, w = phi.shape
        k = min(self.k, self.memory_bank_.shape[0])
        scores = []
        for s in range(0, n, 8):
            q = phi[s:s + 8].permute(0, 2, 3, 1).reshape(-1, d)
            near = sq_dists(q, self.memory_bank_).topk(k, dim=1, largest=False).values
            scores.append(softmin_score(near).cpu())
        patch = torch.cat(scores).reshape(n, h, w)
        maps = to_pixel_map(patch, images.size, self.sigma)
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def _state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_.cpu(), **module_state("descriptor", self.descriptor_)}

    def _extra(self) -> dict[str, Any]:
        return {"channels": self.channels_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.channels_ = int(extra["channels"])
        self.descriptor_ = self._build(self.channels_)
        load_module_state("descriptor", self.descriptor_, {k: v for k, v in tensors.items() if k != "memory_bank"})
        self.descriptor_.eval()
        self.memory_bank_ = tensors["memory_bank"].to(self.device_)
