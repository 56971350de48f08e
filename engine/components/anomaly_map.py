"""Turning patch-level scores into pixel anomaly maps, and feature-map plumbing shared by methods."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ceil(4σ)."""
    r = max(1, int(math.ceil(4 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps[:, None]
    x = F.pad(x, (r, r, 0, 0), mode="reflect" if x.shape[-1] > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode="reflect" if x.shape[-2] > r else "replicate")
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W) bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def to_pixel_map(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Patch scores (N, h, w) -> pixel map (N, H, W): bilinear upsampling then Gaussian smoothing."""
    return gaussian_blur(upsample(patch_scores.float(), size), sigma)


def resize_and_concat(feats: list[torch.Tensor], size: tuple[int, int] | None = None,
                      mode: str = "bilinear") -> torch.Tensor:
    """Resize every (N, C_i, h_i, w_i) to the first's (or given) size and concatenate -> (N, ΣC_i, h, w)."""
    size = size or tuple(feats[0].shape[-2:])
    out = []
    for f in feats:
        if tuple(f.shape[-2:]) != tuple(size):
            kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
            f = F.interpolate(f, size=size, mode=mode, **kw)
        out.append(f)
    return torch.cat(out, 1)


def local_average(f: torch.Tensor, patch: int = 3) -> torch.Tensor:
    """PatchCore's locally aware features: average over a patch×patch neighbourhood, same size."""
    if patch <= 1:
        return f
    return F.avg_pool2d(f, patch, stride=1, padding=patch // 2, count_include_pad=False)
