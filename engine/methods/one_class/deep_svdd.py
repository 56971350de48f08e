"""Deep SVDD over pretrained patch embeddings.

Deep SVDD (Ruff et al., "Deep One-Class Classification", ICML 2018) trains a network φ to map normal
data close to a fixed centre c by minimising the mean squared distance ||φ(x) − c||²; the distance is
the anomaly score. Here φ is a small 1x1-conv network on top of frozen ImageNet patch features, so every
feature-map position (a patch of the image) is one sample and the distances form an anomaly map.
(Patch SVDD, Yi & Yoon 2020, which trains patch encoders from pixels, is `one_class/patch_svdd.py`.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, MethodFailure, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.features import patch_features
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


class SVDDProjector(nn.Module):
    """Bias-free per-position network: (B, C_in, h, w) -> (B, rep_dim, h, w).

    1x1 conv -> BatchNorm without affine parameters -> LeakyReLU, repeated `depth - 1` times, then a final
    1x1 conv. No layer has a bias term, so φ cannot output the constant c by zeroing its weights and
    learning an offset (Deep SVDD's collapse guard, Ruff et al. §3.3); the activation is unbounded.
    """

    def __init__(self, in_channels: int, hidden: int = 256, rep_dim: int = 64, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden, eps=1e-4, affine=False),
                       nn.LeakyReLU(0.1)]
            c = hidden
        layers.append(nn.Conv2d(c, rep_dim, 1, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def guard_centre(c: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Deep SVDD's centre guard: coordinates with |c_j| < eps are pushed to ±eps (keeping their sign; 0 -> +eps).

    A coordinate of c at (near) zero could be hit trivially by zero weights into that output unit.
    c: (D,) -> (D,).
    """
    c = c.clone()
    small = c.abs() < eps
    c[small & (c < 0)] = -eps
    c[small & (c >= 0)] = eps
    return c


@register(
    family="one_class", name="deep_svdd", localises=True,
    paper="Ruff et al., ICML 2018 (Deep SVDD), on pretrained patch features",
    summary="Deep SVDD on pretrained patch features: a bias-free network pulls every normal patch towards one "
            "centre; the distance to it is the anomaly score.",
    notes="Follows Deep SVDD (one-class objective, fixed centre with the eps guard, bias-free network, unbounded "
          "activation) applied per patch to frozen EfficientNet-Lite0 features (blocks.2+blocks.4, PatchCore's 3x3 "
          "local average with zero padding, stride 8) through a 1x1-conv network, instead of the paper's LeNet-type "
          "CNN on whole images (a per-patch variant so that it gives maps). Deep SVDD's autoencoder "
          "pre-training is skipped (random init, seeded); the centre is the mean output of an initial forward "
          "pass with batch statistics. Map: squared distance per position, upsampled, Gaussian σ = 4; image "
          "score: the map's maximum (top_k > 0: mean of the top-k patch distances).",
    trained=True,
    presets={"test": {"epochs": 15}, "fast": {"max_steps": 150, "epochs": 30},
             "quality": {"max_steps": 600, "epochs": 100, "patience": 15}},
)
class DeepSVDD(BaseDetector):
    """One-class Deep SVDD on patch embeddings (see module docstring)."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), patch_size: int = 3, pad: str = "zero",
                 hidden: int = 256,
                 rep_dim: int = 64, depth: int = 2, centre_eps: float = 0.1, epochs: int = 30, lr: float = 1e-3,
                 weight_decay: float = 1e-6, batch_size: int = 8, patience: int = 5, sigma: float = 4.0,
                 top_k: int = 0, max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.pad = pad
        self.hidden = hidden
        self.rep_dim = rep_dim
        self.depth = depth
        self.centre_eps = centre_eps
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience
        self.sigma = sigma
        self.top_k = top_k
        self.max_steps = max_steps
        self.seed = seed

    def _embed(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        """(N, D, h, w) locally averaged patch features at the first layer's resolution."""
        return patch_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                              device=self.device_, patch_size=self.patch_size, pad=self.pad, progress=progress)

    def _build(self, in_channels: int) -> SVDDProjector:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return SVDDProjector(in_channels, self.hidden, self.rep_dim, self.depth)

    def _sq_dist(self, emb: torch.Tensor) -> torch.Tensor:
        """||φ(x) − c||² per position: (B, D, h, w) -> (B, h, w)."""
        z = self.net_(emb).float()
        return ((z - self.centre_[None, :, None, None]) ** 2).sum(1)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        emb = self._embed(train, progress).to(self.device_)
        self.net_ = self._build(emb.shape[1]).to(self.device_)
        with torch.no_grad():  # c from an initial forward pass, BatchNorm using the whole training set's statistics
            self.net_.train()
            c = self.net_(emb).float().mean((0, 2, 3))
            self.net_.eval()
        self.centre_ = guard_centre(c, self.centre_eps)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            return self._sq_dist(emb[idx.to(self.device_)]).mean()

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, patience=self.patience, seed=self.seed)
        res = train_loop(Objective(self.net_.parameters(), loss, name="loss"), len(train), cfg,
                         modules=[self.net_], device=self.device_, progress=progress)
        self.history_ = res.history
        with torch.no_grad():
            d = self._sq_dist(emb)
        if float(d.std()) <= 1e-6 * float(d.mean() + 1e-12):
            raise MethodFailure("deep_svdd collapsed: every training patch maps to the same point")
        self.run_notes_ = {"training": res.summary()}

    def _predict(self, images: ImageSet) -> Prediction:
        emb = self._embed(images)
        self.net_.eval()
        d = torch.cat([self._sq_dist(emb[s:s + 64].to(self.device_)).cpu() for s in range(0, len(emb), 64)])
        if self.top_k > 0:
            k = min(self.top_k, d[0].numel())
            scores = d.flatten(1).topk(k, dim=1).values.mean(1)
        else:
            scores = d.flatten(1).amax(1)
        return Prediction(scores=scores, maps=to_pixel_map(d, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return {**module_state("net", self.net_), "centre": self.centre_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        in_ch = int(tensors["net.net.0.weight"].shape[1])
        self.net_ = self._build(in_ch)
        load_module_state("net", self.net_, {k: v for k, v in tensors.items() if k.startswith("net.")})
        self.net_.to(self.device_).eval()
        self.centre_ = tensors["centre"].to(self.device_)
