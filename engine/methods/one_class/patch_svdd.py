"""Patch SVDD (Yi & Yoon, "Patch SVDD: Patch-level SVDD for Anomaly Detection and Segmentation", ACCV 2020).

Patch encoders are trained from pixels on normal images only:
- a 32 px encoder f32 (eight valid 3x3 convolutions, the first with stride 2, LeakyReLU(0.1), tanh out:
  a 32x32 patch -> a D-vector) and a hierarchical 64 px encoder f64 that encodes the four 32 px quadrants
  of a 64 px patch with the same f32 and merges the 2x2 grid of codes (a 2x2 conv, LeakyReLU, a 1x1 conv,
  tanh);
- loss = L_pos(64) + L_pos(32) + λ · (L_SVDD'(64) + L_SVDD'(32)), where L_SVDD' is the mean distance
  ‖f(p1) − f(p2)‖ between a patch p1 and a patch p2 shifted by at most K/32 px (never 0), and L_pos is the
  cross-entropy of a classifier C(f(p1) − f(p2)) that tells which of the 8 neighbours of p1 a patch p2 is
  (p2 offset by 3K/4 + U[0, K/4) px in that direction, both patches jittered by RGB shift and noise).

At test time every patch (64 px at stride 16, 32 px at stride 4) is embedded and scored by the L2 distance
to its nearest normal patch embedding of the same size; each pixel gets the mean score of the patches
covering it, the two maps are multiplied and the image score is the map's maximum.

Both encoders are fully convolutional, so all patches of an image are embedded in one dense pass: f32 over
the whole image gives one code per 32 px window at stride 2, and f64's 2x2 merge becomes a 2x2 convolution
with dilation 16 cells (32 px) over that map (`PatchSVDDEncoder.dense`, checked against patch-by-patch
encoding in the tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, MethodFailure, Prediction, Progress
from engine.components.knn import NearestNeighbours
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# The paper's 32 px encoder widths (authors' code: EncoderDeep), scaled by `width` in reduced presets.
ENCODER_WIDTHS = (32, 64, 128, 128, 64, 32, 32)
# The 8 neighbours of the relative-position task, as (row, column) directions; the class is the index.
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _kaiming_(convs: Any) -> None:
    """He initialisation for LeakyReLU(0.1), zero biases. PyTorch's default init (the authors' code) shrinks the
    signal through the eight layers so much that, in a short CPU training, every patch got the same code."""
    for c in convs:
        nn.init.kaiming_normal_(c.weight, a=0.1, nonlinearity="leaky_relu")
        nn.init.zeros_(c.bias)


class PatchEncoder32(nn.Module):
    """f32: (N, 3, H, W) -> (N, D, (H − 32) // 2 + 1, (W − 32) // 2 + 1), one code per 32 px window at stride 2.

    A 32x32 patch gives (N, D, 1, 1) (its last row/column of pixels is not read, as in the paper's encoder).
    """

    def __init__(self, dim: int = 64, width: float = 1.0):
        super().__init__()
        widths = [max(4, round(w * width)) for w in ENCODER_WIDTHS]
        chans = [3, *widths, dim]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i == 0 else 1)
                                   for i in range(len(chans) - 1))
        _kaiming_(self.convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            x = F.leaky_relu(x, 0.1) if i < len(self.convs) - 1 else torch.tanh(x)
        return x


class PatchSVDDEncoder(nn.Module):
    """f64 built on f32 (`enc32`, shared): 64 px patches (N, 3, 64, 64) -> (N, D, 1, 1)."""

    def __init__(self, dim: int = 64, width: float = 1.0, hidden: int = 128):
        super().__init__()
        self.enc32 = PatchEncoder32(dim, width)
        self.merge = nn.Conv2d(dim, hidden, 2)
        self.out = nn.Conv2d(hidden, dim, 1)
        _kaiming_([self.merge, self.out])

    def _head(self, grid: torch.Tensor, dilation: int = 1) -> torch.Tensor:
        h = F.conv2d(grid, self.merge.weight, self.merge.bias, dilation=dilation)
        return torch.tanh(self.out(F.leaky_relu(h, 0.1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Hierarchical encoding: the four 32 px quadrants through f32, their 2x2 grid of codes merged."""
        n, k = x.shape[0], x.shape[-1] // 2
        quads = torch.cat([x[..., :k, :k], x[..., :k, k:], x[..., k:, :k], x[..., k:, k:]])
        h = self.enc32(quads)  # (4n, D, 1, 1): top-left, top-right, bottom-left, bottom-right
        grid = torch.cat([torch.cat([h[:n], h[n:2 * n]], 3), torch.cat([h[2 * n:3 * n], h[3 * n:]], 3)], 2)
        return self._head(grid)

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every window of an image: (N, 3, H, W) -> (codes64 (N, D, (H − 64)//2 + 1, ...),
        codes32 (N, D, (H − 32)//2 + 1, ...)), both at stride 2 px; cell (i, j) is the window at (2i, 2j)."""
        e32 = self.enc32(x)
        return self._head(e32, dilation=16), e32


class PositionClassifier(nn.Module):
    """C: (h1 − h2) (N, D) -> logits (N, 8) over the neighbour directions (two 128-unit LeakyReLU layers)."""

    def __init__(self, dim: int = 64, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.1), nn.Linear(hidden, len(NEIGHBOURS)))

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return self.net(h1.flatten(1) - h2.flatten(1))


def svdd_pair_loss(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """SVDD': mean Euclidean distance between the codes of nearby patches. (N, D, ...) x2 -> scalar."""
    return (h1.flatten(1) - h2.flatten(1)).norm(dim=1).mean()


def sample_svdd_pairs(n: int, size: tuple[int, int], k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs of top-left corners (n, 2) x2: p1 uniform, p2 = p1 + a jitter in [−K/32, K/32]² other than 0,
    clipped to the image."""
    p1 = _corners(n, size, k, g)
    j = max(1, k // 32)
    jit = torch.randint(-j, j + 1, (n, 2), generator=g)
    zero = (jit == 0).all(1)
    while zero.any():  # redraw the zero shifts only
        jit[zero] = torch.randint(-j, j + 1, (int(zero.sum()), 2), generator=g)
        zero = (jit == 0).all(1)
    return p1, _clip(p1 + jit, size, k)


def sample_position_pairs(n: int, size: tuple[int, int], k: int,
                          g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n (p1, p2, class) for the relative-position task: p2 lies in neighbour direction `class` of p1 at a
    distance of 3K/4 + U{0, ..., K/4 − 1} px per moving axis, clipped to the image. -> (n, 2), (n, 2), (n,)."""
    p1 = _corners(n, size, k, g)
    cls = torch.randint(0, len(NEIGHBOURS), (n,), generator=g)
    dirs = torch.tensor(NEIGHBOURS)[cls]
    dist = 3 * k // 4 + torch.randint(0, max(1, k // 4), (n, 2), generator=g)
    return p1, _clip(p1 + dirs * dist, size, k), cls


def _corners(n: int, size: tuple[int, int], k: int, g: torch.Generator) -> torch.Tensor:
    """n uniform top-left corners (row, column) of K px patches inside an image of `size`: (n, 2)."""
    return torch.stack([torch.randint(0, size[0] - k + 1, (n,), generator=g),
                        torch.randint(0, size[1] - k + 1, (n,), generator=g)], 1)


def _clip(p: torch.Tensor, size: tuple[int, int], k: int) -> torch.Tensor:
    return torch.stack([p[:, 0].clamp(0, size[0] - k), p[:, 1].clamp(0, size[1] - k)], 1)


def crop(x: torch.Tensor, which: torch.Tensor, corners: torch.Tensor, k: int) -> torch.Tensor:
    """Patches x[which[i], :, r:r+k, c:c+k] for corners (r, c): (N, C, H, W) -> (len(which), C, k, k)."""
    return torch.stack([x[int(i), :, int(r):int(r) + k, int(c):int(c) + k]
                        for i, (r, c) in zip(which.tolist(), corners.tolist(), strict=True)])


def distribute_scores(scores: torch.Tensor, size: tuple[int, int], k: int, stride: int) -> torch.Tensor:
    """Patch scores (N, I, J) of K px patches at `stride` -> pixel map (N, H, W): each pixel gets the mean score
    of the patches covering it (0 where none does)."""
    ones = torch.ones(1, 1, k, k, dtype=scores.dtype)
    total = F.conv_transpose2d(scores[:, None], ones, stride=stride)
    count = F.conv_transpose2d(torch.ones_like(scores[:1, None]), ones, stride=stride)
    h, w = size
    pad = (0, max(0, w - total.shape[-1]), 0, max(0, h - total.shape[-2]))
    total, count = F.pad(total, pad)[..., :h, :w], F.pad(count, pad)[..., :h, :w]
    return (total / count.clamp_min(1))[:, 0]


@register(
    family="one_class", name="patch_svdd", localises=True, trained=True, uses_backbone=False,
    paper="Yi & Yoon, ACCV 2020 (Patch SVDD)",
    summary="Hierarchical patch encoders trained from pixels (SVDD' between nearby patches + a self-supervised "
            "relative-position task); a patch's score is the distance to its nearest normal patch.",
    notes="Follows the paper and its authors' code: 32 px encoder (8 valid 3x3 convs, 32-64-128-128-64-32-32-D, "
          "D = 64, LeakyReLU 0.1, tanh), 64 px hierarchical encoder over the four 32 px quadrants, SVDD' with "
          "jitter K/32, relative-position classifier on h1 − h2 (8 classes, offset 3K/4 + U[0, K/4), RGB shift and "
          "noise σ = 0.02), λ = 1, Adam lr 1e-4, 64 pairs of each kind per step, images at 256 px minus the "
          "training mean image, 1-NN L2 distances at K = 64 (stride 16) and K = 32 (stride 4), per-pixel mean over "
          "covering patches, maps multiplied, score = max. Differences: He initialisation of the encoders "
          "(PyTorch's default, as in the authors' code, made every patch code equal in short trainings); the "
          "authors' last classifier layer is a "
          "weight-normalised linear layer whose weight gets no gradient; here a plain linear layer. Training "
          "length: quality = the paper's 300 epochs of 100 pairs per image (3750 loop epochs of 8 images x 8 "
          "pairs); fast (reduced) works at 128 px with quarter-width encoders, 8 pairs of each kind per step, "
          "200 steps at lr 1e-3, and at most 50 000 normal codes per patch size (a seeded random subset; more than "
          "80 training images at 128 px); pixels of the right/bottom border that no patch covers "
          "score 0, as in the authors' code.",
    presets={"test": {"size": 128, "width": 0.25, "batch_size": 4, "pairs_per_image": 2, "max_steps": 40,
                      "lr": 1e-3},
             "fast": {"size": 128, "width": 0.25, "batch_size": 4, "pairs_per_image": 2, "max_steps": 200,
                      "lr": 1e-3, "max_bank": 50_000},
             "quality": {}},
    reduced_presets=("test", "fast"),
)
class PatchSVDD(BaseDetector):
    """Patch SVDD (see the module docstring). Defaults are the paper's configuration."""

    square_input = True  # resizes every image to size x size

    def __init__(self, size: int = 256, dim: int = 64, width: float = 1.0, lambda_svdd: float = 1.0,
                 lr: float = 1e-4, batch_size: int = 8, pairs_per_image: int = 8, epochs: int = 3750,
                 max_steps: int | None = None, stride64: int = 16, stride32: int = 4, max_bank: int | None = None,
                 seed: int = 0):
        self.size = size
        self.dim = dim
        self.width = width
        self.lambda_svdd = lambda_svdd
        self.lr = lr
        self.batch_size = batch_size
        self.pairs_per_image = pairs_per_image
        self.epochs = epochs
        self.max_steps = max_steps
        self.stride64 = stride64
        self.stride32 = stride32
        self.max_bank = max_bank
        self.seed = seed

    def _check(self) -> None:
        if self.size < 64:
            raise ConfigError(f"patch_svdd: size must be at least 64 px (its largest patch), got {self.size}")
        for name in ("stride64", "stride32"):
            v = getattr(self, name)
            if v < 2 or v % 2:
                raise ConfigError(f"patch_svdd: {name} must be an even number of pixels ≥ 2, got {v}")

    def _build(self) -> PatchSVDDEncoder:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return PatchSVDDEncoder(self.dim, self.width)

    def _working(self, images: ImageSet) -> torch.Tensor:
        """(N, 3, size, size) float in [0, 1] (bilinear, antialiased when shrinking)."""
        x = images.float_images()
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.size).clamp(0, 1)
        return x

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        self._check()
        x = self._working(train)
        self.mean_ = x.mean(0)  # the paper subtracts the training set's mean image
        x = x - self.mean_
        self.enc_ = self._build().to(self.device_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            cls64, cls32 = PositionClassifier(self.dim).to(self.device_), PositionClassifier(self.dim).to(self.device_)
        g = self.generator_
        size = (self.size, self.size)

        def jitter(p: torch.Tensor) -> torch.Tensor:  # per-patch RGB shift and per-pixel noise, σ = 0.02
            return (p + 0.02 * torch.randn(p.shape[0], 3, 1, 1, generator=g)
                    + 0.02 * torch.randn(p.shape, generator=g))

        def loss(idx: torch.Tensor) -> torch.Tensor:
            which = idx.repeat_interleave(self.pairs_per_image)
            n = len(which)
            total = torch.zeros((), device=self.device_)
            for k, enc, cls in ((64, self.enc_, cls64), (32, self.enc_.enc32, cls32)):
                a, b, y = sample_position_pairs(n, size, k, g)
                p1, p2 = jitter(crop(x, which, a, k)), jitter(crop(x, which, b, k))
                total = total + F.cross_entropy(cls(enc(p1.to(self.device_)), enc(p2.to(self.device_))).float(),
                                                y.to(self.device_))
                a, b = sample_svdd_pairs(n, size, k, g)
                h1, h2 = enc(crop(x, which, a, k).to(self.device_)), enc(crop(x, which, b, k).to(self.device_))
                total = total + self.lambda_svdd * svdd_pair_loss(h1.float(), h2.float())
            return total

        cfg = TrainConfig(epochs=self.epochs, max_steps=self.max_steps, lr=self.lr, weight_decay=0.0,
                          batch_size=self.batch_size, cuda_batch_size=self.batch_size, val_fraction=0.0,
                          grad_clip=None, seed=self.seed)
        res = train_loop(Objective([*self.enc_.parameters(), *cls64.parameters(), *cls32.parameters()], loss),
                         len(x), cfg, modules=[self.enc_, cls64, cls32], device=self.device_, progress=progress)
        self.history_ = res.history
        e64, e32 = self._embed(x)
        self.bank64_ = self._cap(e64.permute(0, 2, 3, 1).reshape(-1, self.dim))
        self.bank32_ = self._cap(e32.permute(0, 2, 3, 1).reshape(-1, self.dim))
        if float(self.bank32_.std(0).max()) < 1e-6:
            raise MethodFailure("patch_svdd collapsed: every training patch has the same code")
        self.run_notes_ = {"training": res.summary(),
                           "resolution": f"trained and scored at {self.size}×{self.size} px"
                                         + ("" if self.width == 1.0 else f", encoders at {self.width:g}× width")}

    def _cap(self, bank: torch.Tensor) -> torch.Tensor:
        """At most `max_bank` normal codes (a seeded random subset; None keeps all, as the paper): (M, D) -> (M', D).
        Bounds the nearest-neighbour search on large training sets."""
        if self.max_bank is None or len(bank) <= self.max_bank:
            return bank
        return bank[torch.randperm(len(bank), generator=self.generator_)[:self.max_bank]]

    def _embed(self, x: torch.Tensor, bs: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised images (N, 3, S, S) -> codes of the scored patches: (N, D, I64, J64), (N, D, I32, J32)."""
        self.enc_.eval()
        s64, s32 = self.stride64 // 2, self.stride32 // 2
        outs64, outs32 = [], []
        with torch.no_grad():
            for i in range(0, len(x), bs):
                e64, e32 = self.enc_.dense(x[i:i + bs].to(self.device_))
                outs64.append(e64[..., ::s64, ::s64].float().cpu())
                outs32.append(e32[..., ::s32, ::s32].float().cpu())
        return torch.cat(outs64), torch.cat(outs32)

    def _level_map(self, codes: torch.Tensor, bank: torch.Tensor, k: int, stride: int) -> torch.Tensor:
        """Nearest-normal distances of codes (N, D, I, J) spread over the pixels: (N, size, size)."""
        n, d, i, j = codes.shape
        nn_ = NearestNeighbours(bank, self.device_)
        dist, _ = nn_.search(codes.permute(0, 2, 3, 1).reshape(-1, d), k=1, chunk=4096)
        return distribute_scores(dist[:, 0].reshape(n, i, j), (self.size, self.size), k, stride)

    def _predict(self, images: ImageSet) -> Prediction:
        e64, e32 = self._embed(self._working(images) - self.mean_)
        maps = (self._level_map(e64, self.bank64_, 64, self.stride64)
                * self._level_map(e32, self.bank32_, 32, self.stride32))
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def _state(self) -> dict[str, torch.Tensor]:
        return {**module_state("enc", self.enc_), "mean": self.mean_, "bank64": self.bank64_, "bank32": self.bank32_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.enc_ = self._build()
        load_module_state("enc", self.enc_, {k: v for k, v in tensors.items() if k.startswith("enc.")})
        self.enc_.to(self.device_).eval()
        self.mean_, self.bank64_, self.bank32_ = tensors["mean"], tensors["bank64"], tensors["bank32"]
