"""Small convolutional networks trained from scratch, and SSIM (used by the reconstruction family and GANomaly).

Shapes:
    ConvEncoder: (N, in_channels, H, W) -> (N, latent_channels, H / 2**depth, W / 2**depth)   latent="map"
                                         -> (N, latent_dim)                                     latent="vector"
    ConvDecoder: the inverse; (N, latent_channels, h, w) or (N, latent_dim) -> (N, out_channels, H, W)
    ssim_map:    (N, C, H, W), (N, C, H, W) -> (N, H, W), the per-pixel SSIM averaged over channels

H and W must be divisible by 2**depth (depth = len(widths)). A "vector" latent needs the image size at
construction (the flattening layer's size depends on it); a "map" latent works at any such size.
Down blocks: Conv 4x4 stride 2 -> BatchNorm -> LeakyReLU(0.2) (+ `extra_convs` Conv 3x3 blocks).
Up blocks: nearest upsample x2 -> Conv 3x3 -> BatchNorm -> LeakyReLU(0.2) (+ `extra_convs`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.components.anomaly_map import blur_matrix


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (BatchNorm's running statistics, no dropout) and without gradients for the block;
    its mode (training or not) is restored afterwards, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool tensor of `shape`, True (kept) with probability 1 − p, from the default generator of `device`.

    Each element compares a uniform 16-bit integer (four per 64-bit draw) with round(p·2¹⁶): the drop rate is p
    to within 2⁻¹⁷ (0.1 → 0.100006), far below the spread of the kept fraction of any mask worth drawing. On
    CPU this is about 3× faster than torch's Bernoulli sampling, which draws one double per element (UniAD's
    attention dropout was half of its training step).
    """
    return _uniform16(shape, device) >= _threshold16(p)


def _uniform16(shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """Uniform int16 of `shape` (all 2¹⁶ values equally likely), four per 64-bit draw of the default generator."""
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n].view(shape)


def _threshold16(p: float) -> int:
    """The int16 at or above which a `_uniform16` value is kept: P(kept) = 1 − p to within 2⁻¹⁷."""
    return round(p * 2**16) - 2**15


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, (...) -> (...): zero each element with probability p and scale the rest by 1 / (1 − p)
    while training; identity otherwise. `F.dropout` on CUDA; on CPU with `dropout_mask`'s faster sampling and
    the mask as a scaled float tensor (a product with it is about 3× faster than `torch.where` with a bool one,
    here and in the backward pass), compared straight into x's dtype: converting a bool tensor costs 5× more
    than the comparison that makes it (2M elements: 5.5 ms)."""
    if not training or p <= 0:
        return x
    if p >= 1:
        return torch.zeros_like(x)
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    mask = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ge(_uniform16(tuple(x.shape), x.device), _threshold16(p), out=mask)
    return x * mask.mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout` with `dropout`'s faster CPU sampling: (...) -> (...)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2, inplace=True)


def conv_block(c_in: int, c_out: int, extra_convs: int = 0) -> nn.Sequential:
    """Conv 3x3 -> BN -> LeakyReLU, then `extra_convs` more of the same; keeps H, W."""
    layers: list[nn.Module] = []
    for i in range(1 + extra_convs):
        layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), _act()]
    return nn.Sequential(*layers)


def down_block(c_in: int, c_out: int, extra_convs: int = 0) -> nn.Sequential:
    """Strided Conv 4x4/2 -> BN -> LeakyReLU (+ extra 3x3 convs): (N, c_in, H, W) -> (N, c_out, H/2, W/2)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                               nn.BatchNorm2d(c_out), _act()]
    if extra_convs:
        layers.append(conv_block(c_out, c_out, extra_convs - 1))
    return nn.Sequential(*layers)


def up_block(c_in: int, c_out: int, extra_convs: int = 0) -> nn.Sequential:
    """Nearest x2 upsample -> Conv 3x3 -> BN -> LeakyReLU (+ extras): (N, c_in, h, w) -> (N, c_out, 2h, 2w)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv_block(c_in, c_out, extra_convs))


def _size(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    return (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


class ConvEncoder(nn.Module):
    """Strided-conv encoder. widths[i] channels after the i-th halving; depth = len(widths).

    latent="map": a final 3x3 conv to `latent_channels` -> (N, latent_channels, H/2^d, W/2^d) (no activation).
    latent="vector": flatten that map and a linear layer -> (N, latent_dim); needs `image_size`.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 256), latent_channels: int = 64,
                 latent: str = "map", latent_dim: int = 128, image_size: int | tuple[int, int] | None = None,
                 extra_convs: int = 0):
        super().__init__()
        if latent not in ("map", "vector"):
            raise ValueError("latent must be 'map' or 'vector'")
        self.depth = len(widths)
        chans = [in_channels, *widths]
        self.blocks = nn.Sequential(*[down_block(chans[i], chans[i + 1], extra_convs) for i in range(self.depth)])
        self.to_latent = nn.Conv2d(widths[-1], latent_channels, 3, padding=1)
        self.latent = latent
        self.fc: nn.Linear | None = None
        if latent == "vector":
            size = _size(image_size)
            if size is None:
                raise ValueError("a vector latent needs image_size")
            h, w = size[0] >> self.depth, size[1] >> self.depth
            self.fc = nn.Linear(latent_channels * h * w, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, latent_channels, H/2^d, W/2^d) or (N, latent_dim)."""
        m = 1 << self.depth
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by {m} (2**depth)")
        z = self.to_latent(self.blocks(x))
        return z if self.fc is None else self.fc(z.flatten(1))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: latent -> (N, out_channels, H, W).

    widths are given in the encoder's order (small to large depth) and used reversed. out_activation:
    "sigmoid" (images in [0, 1]), "none" (logits / unbounded).
    """

    def __init__(self, out_channels: int = 3, widths: Sequence[int] = (32, 64, 128, 256), latent_channels: int = 64,
                 latent: str = "map", latent_dim: int = 128, image_size: int | tuple[int, int] | None = None,
                 extra_convs: int = 0, out_activation: str = "sigmoid"):
        super().__init__()
        if latent not in ("map", "vector"):
            raise ValueError("latent must be 'map' or 'vector'")
        self.depth = len(widths)
        rev = list(widths)[::-1]
        self.latent_channels = latent_channels
        self.fc: nn.Linear | None = None
        self.map_size: tuple[int, int] | None = None
        if latent == "vector":
            size = _size(image_size)
            if size is None:
                raise ValueError("a vector latent needs image_size")
            self.map_size = (size[0] >> self.depth, size[1] >> self.depth)
            self.fc = nn.Linear(latent_dim, latent_channels * self.map_size[0] * self.map_size[1])
        self.from_latent = nn.Sequential(nn.Conv2d(latent_channels, rev[0], 3, padding=1, bias=False),
                                         nn.BatchNorm2d(rev[0]), _act())
        outs = [*rev[1:], rev[-1]]
        self.blocks = nn.Sequential(*[up_block(rev[i], outs[i], extra_convs) for i in range(self.depth)])
        self.head = nn.Conv2d(rev[-1], out_channels, 3, padding=1)
        if out_activation not in ("sigmoid", "none"):
            raise ValueError("out_activation must be 'sigmoid' or 'none'")
        self.out_activation = out_activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_channels, h, w) or (N, latent_dim) -> (N, out_channels, h * 2^d, w * 2^d)."""
        if self.fc is not None:
            assert self.map_size is not None
            z = self.fc(z).view(z.shape[0], self.latent_channels, *self.map_size)
        y = self.head(self.blocks(self.from_latent(z)))
        return torch.sigmoid(y) if self.out_activation == "sigmoid" else y


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
             data_range: float = 1.0) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004) with a Gaussian window, averaged over channels.

    x, y: (N, C, H, W) float in a range of width `data_range`. window: odd size of the Gaussian window
    (σ = `sigma`, truncated to the window). Local statistics use population (biased) covariances and
    reflect padding, as skimage's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    Returns (N, H, W); 1 where x and y agree locally, lower elsewhere (can be negative).
    """
    if window % 2 != 1:
        raise ValueError("window must be odd")
    if x.dtype != torch.float64:
        # Variances are differences of nearly equal blurred moments: in bf16 (CPU autocast) they cancel to noise and
        # the ratio below blows up, so the statistics are always taken in fp32 (gradients flow through the cast).
        with torch.autocast(x.device.type, enabled=False):
            return _ssim(x.float(), y.float(), window, sigma, data_range)
    return _ssim(x, y, window, sigma, data_range)


def _ssim(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float, data_range: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    # The Gaussian blur as two matrix products with the border folded in: one GEMM per axis for all five moments
    # at once, instead of a padded copy and a depthwise convolution pair per moment.
    reflect = min(h, w) > window // 2
    bw = blur_matrix(w, sigma, window // 2, reflect, x.dtype).to(x.device)
    bh = blur_matrix(h, sigma, window // 2, reflect, x.dtype).to(x.device)
    moments = torch.stack([x, y, x * x, y * y, x * y]).contiguous()  # (5, N, C, H, W)
    blurred = (moments @ bw).transpose(-1, -2) @ bh  # (5, N, C, W, H)
    mx, my, exx, eyy, exy = blurred.transpose(-1, -2).unbind(0)
    vxx = exx - mx * mx
    vyy = eyy - my * my
    vxy = exy - mx * my
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vxx + vyy + c2))
    return s.mean(1)


__all__ = ["ConvDecoder", "ConvEncoder", "Dropout", "conv_block", "down_block", "dropout",
           "dropout_mask", "ssim_map", "up_block"]
