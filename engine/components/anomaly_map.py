"""Turning patch-level scores into pixel anomaly maps, and feature-map plumbing shared by methods."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised 1-D Gaussian, shape (2·radius + 1,); radius ceil(4σ) unless given (SSIM's window uses 5)."""
    r = max(1, int(math.ceil(4 * sigma))) if radius is None else radius
    t = torch.arange(-r, r + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@functools.lru_cache(maxsize=32)
def blur_matrix(n: int, sigma: float, radius: int | None = None, reflect: bool | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) matrix B such that x @ B blurs the last axis of x (…, n) with `gaussian_kernel1d(sigma, radius)`,
    the border folded in: reflected (the edge sample not repeated), or replicated when reflect=False; by default
    reflected unless n is not longer than the radius, where reflect=True is refused. Only the band
    |i − j| ≤ radius (plus the folded border) is non-zero. Cached: the caller must not modify it.
    """
    # Never an inference tensor, even when first asked for inside torch.inference_mode (a prediction): the cached
    # matrix also serves training steps (SSIM losses), where autograd must save it for the backward pass.
    with torch.inference_mode(False):
        k = gaussian_kernel1d(sigma, radius, dtype)
        r = k.numel() // 2
        if reflect is None:
            reflect = n > r
        elif reflect and n <= r:
            raise ValueError(f"reflect padding of {r} needs more than {r} samples, got {n}")
        eye = F.pad(torch.eye(n, dtype=dtype)[:, None], (r, r), mode="reflect" if reflect else "replicate")
        return F.conv1d(eye, k.view(1, 1, -1))[:, 0]  # row i: where sample i lands, (n, n + 2r) → (n, n)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, H, W) maps with reflect padding.

    Two products with banded (W, W) and (H, H) matrices: the same sums as a padded convolution, without
    the convolution's im2col buffer (about 0.5 GB for 113 maps of 256² px, the largest allocation of a
    PatchCore or PaDiM prediction; benchmarks/bench_blur.py).
    """
    if sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    bw = blur_matrix(w, float(sigma)).to(maps.device, maps.dtype)
    bh = blur_matrix(h, float(sigma)).to(maps.device, maps.dtype)
    return torch.matmul(bh.t(), maps @ bw)


def resample_cells(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a conv feature map (N, C, h, w) to (N, C, H, W) keeping cells over the pixels they see.

    With symmetric padding, cell i of a stride-s feature map is centred on input pixel i·s, not on
    (i + 0.5)·s − 0.5 as `F.interpolate(align_corners=False)` assumes; that assumption shifts every map
    by (s − 1)/2 pixels down and right (7.5 px at stride 16). Here target cell p (centred on p·S with
    S = image / H) reads source coordinate p·h/H, with border values beyond the last cell; mode "nearest"
    takes the source cell nearest that coordinate (ties to the lower index).
    """
    h, w = x.shape[-2:]
    big_h, big_w = size
    if (h, w) == (big_h, big_w):
        return x
    if mode == "nearest":
        return x[..., nearest_cells(h, big_h, x.device)[:, None], nearest_cells(w, big_w, x.device)[None, :]]

    def axis(n_src: int, n_dst: int) -> torch.Tensor:
        c = torch.arange(n_dst, dtype=torch.float32, device=x.device) * (n_src / n_dst)
        return c * (2.0 / (n_src - 1)) - 1.0 if n_src > 1 else torch.zeros_like(c)

    gy, gx = torch.meshgrid(axis(h, big_h), axis(w, big_w), indexing="ij")
    grid = torch.stack((gx, gy), -1).unsqueeze(0).expand(x.shape[0], -1, -1, -1).to(x.dtype)
    return F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=True)


def nearest_cells(n_src: int, n_dst: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n_dst,) int64: the source cell that target cell p of `resample_cells(mode="nearest")` reads along one axis.

    Exact integer arithmetic: a target cell halfway between two source cells takes the lower one (grid_sample
    would break such ties by floating-point noise, differently from cell to cell).
    """
    p = torch.arange(n_dst, device=device)
    return (-((n_dst - 2 * p * n_src) // (2 * n_dst))).clamp_(0, n_src - 1)  # ceil(p·n_src/n_dst − ½)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Patch-score maps (N, h, w) -> (N, H, W), each cell placed over the pixel it is centred on."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return resample_cells(maps[:, None], size)[:, 0]


def to_pixel_map(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0,
                 chunk: int = 32) -> torch.Tensor:
    """Patch scores (N, h, w) -> pixel map (N, H, W) float32: bilinear upsampling then Gaussian smoothing.

    `chunk` images at a time into the output, so only the output is full size (upsampled maps and the blur's
    intermediate product of the whole set were two more: 2 × 172 MB for 582 maps of 288×256 px).
    """
    n = patch_scores.shape[0]
    out = torch.empty(n, *size, dtype=torch.float32, device=patch_scores.device)
    for s in range(0, n, chunk):
        out[s:s + chunk] = gaussian_blur(upsample(patch_scores[s:s + chunk].float(), size), sigma)
    return out


def resize_and_concat(feats: list[torch.Tensor], size: tuple[int, int] | None = None,
                      mode: str = "bilinear") -> torch.Tensor:
    """Resize every (N, C_i, h_i, w_i) to the first's (or given) size and concatenate -> (N, ΣC_i, h, w).

    Cells stay over the pixels they see (see resample_cells); mode "bilinear" or "nearest".
    """
    size = size or tuple(feats[0].shape[-2:])
    return torch.cat([resample_cells(f, size, mode) for f in feats], 1)


def gather_positions(feats: list[torch.Tensor], size: tuple[int, int], positions: torch.Tensor) -> torch.Tensor:
    """Rows of the nearest-resampled concatenation at some grid positions, position-major.

    feats: per-layer (N, C_i, h_i, w_i); size (H, W); positions (k,) flat indices y·W + x into the (H, W) grid.
    Returns (k, N, ΣC_i), equal to
    ``resize_and_concat(feats, size, "nearest").permute(2, 3, 0, 1).reshape(H * W, N, ΣC_i)[positions]``
    without building the (N, ΣC, H, W) map (2.5 GB for PaDiM on 762 images of 288×256 px). It is a view of an
    (N, ΣC, k) tensor, positions fastest, as that reshape is a view of the map: reductions over N then add in the
    same order and give the same bits.
    """
    big_h, big_w = size
    py, px = positions // big_w, positions % big_w
    parts = []
    for f in feats:
        h, w = f.shape[-2:]
        src = nearest_cells(h, big_h, f.device)[py] * w + nearest_cells(w, big_w, f.device)[px]
        parts.append(f.flatten(2)[:, :, src])
    return torch.cat(parts, 1).permute(2, 0, 1)


PADDINGS = ("zero", "valid")


def local_average(f: torch.Tensor, patch: int = 3, pad: str = "zero") -> torch.Tensor:
    """Locally aware features (PatchCore): the mean over a patch×patch neighbourhood, (N, C, h, w) -> same shape.

    pad "zero": border windows count the zero padding (divide by patch²), as PatchCore's paper code and
    anomalib do; border cells shrink towards zero. "valid": border windows average only the cells inside
    the map. The choice matters: on the bundled grass sample a full-bank PatchCore scored image AUROC
    0.896 with "valid" and 1.000 with "zero".
    """
    if pad not in PADDINGS:
        raise ValueError(f"pad must be one of {PADDINGS}, got {pad!r}")
    if patch <= 1:
        return f
    return F.avg_pool2d(f, patch, stride=1, padding=patch // 2, count_include_pad=pad == "zero")
