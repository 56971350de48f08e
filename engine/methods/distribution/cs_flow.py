"""CS-Flow (Rudolph, Wehrbein, Rosenhahn & Wandt, "Fully Convolutional Cross-Scale-Flows for Image-based
Defect Detection", WACV 2022).

The image is seen at three resolutions; one frozen backbone layer gives a feature map per resolution (the
same channels, grids halving from scale to scale). One normalizing flow maps the three maps *jointly* to
Gaussians: each coupling block's subnetwork is a cross-scale convolution, so the scale and shift for one
resolution are computed from all three (same-scale conv + upsampled coarser + strided finer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress
from engine.components.anomaly_map import upsample
from engine.components.features import extract_features
from engine.components.flows import soft_clamp
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

Scales = list[torch.Tensor]  # one (N, C, h_s, w_s) map per scale, finest first


class CrossScaleConv(nn.Module):
    """CS-Flow's subnetwork over S scales: (N, c_in, h_s, w_s) per scale -> (N, c_out, h_s, w_s) per scale.

    hidden_s = LeakyReLU(conv_k(x_s)); out_s = γ_s · (conv_k(hidden_s) + conv_k(up(hidden_{s+1}))
    + strided conv_k(hidden_{s−1})): every output sees its own scale and both neighbours. γ starts at 0, so
    a fresh coupling block is the identity.
    """

    def __init__(self, c_in: int, c_out: int, hidden: int, kernel_size: int = 3, n_scales: int = 3,
                 slope: float = 0.1):
        super().__init__()
        p = kernel_size // 2
        self.inner = nn.ModuleList(nn.Conv2d(c_in, hidden, kernel_size, padding=p) for _ in range(n_scales))
        self.same = nn.ModuleList(nn.Conv2d(hidden, c_out, kernel_size, padding=p) for _ in range(n_scales))
        self.from_coarser = nn.ModuleList(nn.Conv2d(hidden, c_out, kernel_size, padding=p)
                                          for _ in range(n_scales - 1))
        self.from_finer = nn.ModuleList(nn.Conv2d(hidden, c_out, kernel_size, padding=p, stride=2)
                                        for _ in range(n_scales - 1))
        self.gamma = nn.Parameter(torch.zeros(n_scales))
        self.slope = slope

    def forward(self, xs: Scales) -> Scales:
        h = [F.leaky_relu(conv(x), self.slope) for conv, x in zip(self.inner, xs, strict=True)]
        out = []
        for s, hs in enumerate(h):
            size = hs.shape[-2:]
            y = self.same[s](hs)
            if s + 1 < len(h):
                y = y + self.from_coarser[s](F.interpolate(h[s + 1], size=size, mode="bilinear", align_corners=False))
            if s > 0:
                down = self.from_finer[s - 1](h[s - 1])
                if down.shape[-2:] != size:  # odd grid sizes: the strided conv rounds up
                    down = F.interpolate(down, size=size, mode="bilinear", align_corners=False)
                y = y + down
            out.append(self.gamma[s] * y)
        return out


class CrossScaleCoupling(nn.Module):
    """One parallel (GLOW-style) affine coupling over all scales, then a fixed channel permutation.

    Channels split into a (c1) and b (c2): (s1, t1) = net1(a) -> b' = b·exp(s1) + t1; (s2, t2) = net2(b')
    -> a' = a·exp(s2) + t2; s soft-clamped with clamp·(2/π)·atan(s/clamp). log_det per scale: (N, h_s, w_s).
    """

    def __init__(self, channels: int, hidden: int, kernel_size: int = 3, clamp: float = 3.0, n_scales: int = 3,
                 permute_seed: int = 0):
        super().__init__()
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.clamp = clamp
        self.net1 = CrossScaleConv(self.c1, 2 * self.c2, hidden, kernel_size, n_scales)
        self.net2 = CrossScaleConv(self.c2, 2 * self.c1, hidden, kernel_size, n_scales)
        perm = torch.randperm(channels, generator=torch.Generator().manual_seed(permute_seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _st(self, net: CrossScaleConv, xs: Scales, c: int) -> tuple[Scales, Scales]:
        out = net(xs)
        return [soft_clamp(o[:, :c], self.clamp, "atan") for o in out], [o[:, c:] for o in out]

    def forward(self, xs: Scales) -> tuple[Scales, Scales]:
        """xs -> (ys, log_dets): per scale (N, C, h, w) and (N, h, w)."""
        a = [x[:, : self.c1] for x in xs]
        b = [x[:, self.c1:] for x in xs]
        s1, t1 = self._st(self.net1, a, self.c2)
        b = [bi * torch.exp(si) + ti for bi, si, ti in zip(b, s1, t1, strict=True)]
        s2, t2 = self._st(self.net2, b, self.c1)
        a = [ai * torch.exp(si) + ti for ai, si, ti in zip(a, s2, t2, strict=True)]
        ys = [torch.cat([ai, bi], 1)[:, self.perm] for ai, bi in zip(a, b, strict=True)]
        return ys, [x.sum(1) + y.sum(1) for x, y in zip(s1, s2, strict=True)]

    def inverse(self, ys: Scales) -> Scales:
        """Exact inverse of forward: ys -> xs."""
        ys = [y[:, self.inv_perm] for y in ys]
        a = [y[:, : self.c1] for y in ys]
        b = [y[:, self.c1:] for y in ys]
        s2, t2 = self._st(self.net2, b, self.c1)
        a = [(ai - ti) * torch.exp(-si) for ai, si, ti in zip(a, s2, t2, strict=True)]
        s1, t1 = self._st(self.net1, a, self.c2)
        b = [(bi - ti) * torch.exp(-si) for bi, si, ti in zip(b, s1, t1, strict=True)]
        return [torch.cat([ai, bi], 1) for ai, bi in zip(a, b, strict=True)]


class CrossScaleFlow(nn.Module):
    """A stack of CrossScaleCoupling blocks: per scale x (N, C, h_s, w_s) -> z (same shapes), log_det (N, h_s, w_s)."""

    def __init__(self, channels: int, n_blocks: int, hidden: int, kernel_size: int = 3, clamp: float = 3.0,
                 n_scales: int = 3, seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(CrossScaleCoupling(channels, hidden, kernel_size, clamp, n_scales, seed + k)
                                    for k in range(n_blocks))

    def forward(self, xs: Scales) -> tuple[Scales, Scales]:
        log_det = [torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype, device=x.device) for x in xs]
        for block in self.blocks:
            xs, ld = block(xs)
            log_det = [a + b for a, b in zip(log_det, ld, strict=True)]
        return xs, log_det

    def inverse(self, zs: Scales) -> Scales:
        for block in reversed(self.blocks):
            zs = block.inverse(zs)
        return zs


def cs_flow_nll(zs: Scales, log_dets: Scales) -> torch.Tensor:
    """Per-image negative log-likelihood per dimension (constant dropped): (½ Σ z² − Σ log_det) / #dims -> (N,)."""
    sq = sum(0.5 * (z * z).flatten(1).sum(1) for z in zs)
    ld = sum(d.flatten(1).sum(1) for d in log_dets)
    dims = sum(z[0].numel() for z in zs)
    return (sq - ld) / dims


@register(
    family="distribution", name="cs_flow", localises=True, trained=True,
    paper="Rudolph et al., WACV 2022 (CS-Flow)",
    summary="One fully convolutional normalizing flow over the feature maps of the image at three resolutions "
            "jointly; cross-scale couplings; score = mean ‖z‖² (high = unlikely).",
    notes="EfficientNet-Lite0 blocks.4 (112 channels, stride 16) of the image at full, 1/2 and 1/4 size stands in "
          "for EfficientNet-B5's 36th layer (304 channels) at 768/384/192 px. Features standardised per channel "
          "with the training mean and std (the paper feeds raw features). Parallel affine couplings with "
          "cross-scale convolution subnets (same-scale conv + upsampled coarser + strided finer), atan soft clamp "
          "3, zero-initialised output gains, 4 blocks as the paper; hidden channels 64/128 instead of 1024 and far "
          "fewer steps than the paper's 240 epochs on CPU (reduced). Score = mean of z² over all scales and "
          "positions as the paper; map = per-position mean over channels of z², upsampled and averaged over "
          "scales.",
    presets={
        "test": {"epochs": 15, "hidden": 64, "lr": 2e-3},
        "fast": {"epochs": 20, "max_steps": 150, "hidden": 64, "lr": 2e-3},
        "quality": {"epochs": 60, "max_steps": 500, "hidden": 128, "lr": 1e-3},
    },
)
class CSFlow(BaseDetector):
    """Cross-scale normalizing flow over a three-level image pyramid of backbone features.

    Features per scale (N, C, h_s, w_s) -> z per scale; map (N, H, W) = mean over scales of upsampled
    mean_c z²; score (N,) = mean of z² over every scale, channel and position.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto", layer: str = "blocks.4",
                 scales: tuple[float, ...] = (1.0, 0.5, 0.25), n_blocks: int = 4, hidden: int = 128,
                 kernel_size: int = 3, clamp: float = 3.0, epochs: int = 30, batch_size: int = 8, lr: float = 1e-3,
                 weight_decay: float = 1e-5, max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layer = layer
        self.scales = tuple(scales)
        self.n_blocks = n_blocks
        self.hidden = hidden
        self.kernel_size = kernel_size
        self.clamp = clamp
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.seed = seed

    def feature_layers(self) -> tuple[str, ...]:
        return (self.layer,)

    def _pyramid(self, images: ImageSet, progress: Progress | None = None) -> Scales:
        """Per scale (N, C, h_s, w_s) backbone features of the image resized by that factor (cached)."""
        h, w = images.size
        out = []
        for f in self.scales:
            if f == 1.0:
                resized = images
            else:
                size = (max(16, round(h * f)), max(16, round(w * f)))
                x = F.interpolate(images.float_images(), size=size, mode="bilinear", antialias=True,
                                  align_corners=False)
                resized = ImageSet(images=(x.clamp(0, 1) * 255).round().to(torch.uint8))
            kw = {"progress": progress} if progress else {}
            out.append(extract_features(resized, (self.layer,), backbone=self.backbone, weights=self.weights,
                                        device=self.device_, **kw)[0])
        return [(x - self.mean_[s]) / self.std_[s] for s, x in enumerate(out)] if hasattr(self, "mean_") else out

    def _build(self, channels: int) -> CrossScaleFlow:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return CrossScaleFlow(channels, self.n_blocks, self.hidden, self.kernel_size, self.clamp,
                                  len(self.scales), seed=self.seed * 1000).to(self.device_)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if len(self.scales) < 2 or any(not 0 < f <= 1 for f in self.scales):
            raise ConfigError(f"cs_flow.scales must be ≥ 2 factors in (0, 1], got {self.scales}")
        for name in ("mean_", "std_"):
            self.__dict__.pop(name, None)
        raw = self._pyramid(train, progress)
        self.mean_ = [x.mean((0, 2, 3), keepdim=True)[0] for x in raw]
        self.std_ = [x.std((0, 2, 3), keepdim=True)[0].clamp_min(1e-6) for x in raw]
        feats = [(x - m) / s for x, m, s in zip(raw, self.mean_, self.std_, strict=True)]
        self.channels_ = int(feats[0].shape[1])
        self.flow_ = self._build(self.channels_)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            zs, lds = self.flow_([f[idx].to(self.device_) for f in feats])
            return cs_flow_nll(zs, lds).mean()

        cfg = TrainConfig(epochs=self.epochs, max_steps=self.max_steps, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, seed=self.seed)
        res = train_loop(Objective(list(self.flow_.parameters()), loss), len(train), cfg, modules=[self.flow_],
                         device=self.device_, progress=progress)
        self.run_notes_ = {"training": res.summary()}

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._pyramid(images)
        maps, scores = [], []
        for s in range(0, len(images), 16):
            zs, _ = self.flow_([f[s:s + 16].to(self.device_) for f in feats])
            per_pos = [(z * z).mean(1).cpu() for z in zs]
            maps.append(torch.stack([upsample(p, images.size) for p in per_pos]).mean(0))
            dims = sum(z[0].numel() for z in zs)
            scores.append(sum((z * z).flatten(1).sum(1).cpu() for z in zs) / dims)
        return Prediction(scores=torch.cat(scores), maps=torch.cat(maps))

    def _state(self) -> dict[str, torch.Tensor]:
        out = module_state("flow", self.flow_)
        for s, (m, sd) in enumerate(zip(self.mean_, self.std_, strict=True)):
            out[f"mean.{s}"], out[f"std.{s}"] = m, sd
        return out

    def _extra(self) -> dict[str, Any]:
        return {"channels": self.channels_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.channels_ = int(extra["channels"])
        self.mean_ = [tensors[f"mean.{s}"] for s in range(len(self.scales))]
        self.std_ = [tensors[f"std.{s}"] for s in range(len(self.scales))]
        self.flow_ = self._build(self.channels_)
        load_module_state("flow", self.flow_, {k: v for k, v in tensors.items() if k.startswith("flow.")})
        self.flow_.eval()
