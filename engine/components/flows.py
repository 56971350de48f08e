"""Normalizing-flow parts: affine coupling blocks with soft-clamped scales, fixed channel permutations,
optional conditioning, and the standard-normal log-likelihood per position.

Shapes: a flow works on `x` of shape (N, C, *S) where S is any spatial shape — (H, W) for FastFlow's 2D
flows, () for CFlow's fibers (N, C). The channel axis is always dim 1. A condition `c`, when used, has
shape (N, P, *S) and is concatenated to the subnetwork's input along the channel axis.

Log-determinants are returned **per position**: (N, *S), the sum over channels of the log-scales. Because
each coupling's scale at a position only depends on the untouched half (and the condition), the log |det|
of the Jacobian of the whole map (N fixed) is the sum of these per-position terms over all positions; the
per-position split is what both papers use for their likelihood maps.

Clamping: the raw log-scale `s` of every coupling is squashed to `clamp * tanh(s / clamp)` ("tanh", the
default, slope 1 at 0) or `clamp * (2 / π) * atan(s / clamp)` ("atan", the choice of the CFLOW/FastFlow
reference code, slope 2/π at 0); both are monotone and bounded by ±clamp, so one coupling can change a
value's scale by at most exp(clamp) — training cannot overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# (in_channels, out_channels) -> a module mapping (N, in, *S) to (N, out, *S)
SubnetFactory = Callable[[int, int], nn.Module]

_LOG_2PI = math.log(2.0 * math.pi)


def soft_clamp(s: torch.Tensor, clamp: float, kind: str = "tanh") -> torch.Tensor:
    """Bound log-scales smoothly and monotonically to (-clamp, clamp). Same shape as `s`."""
    if clamp <= 0:
        return s
    if kind == "tanh":
        return clamp * torch.tanh(s / clamp)
    if kind == "atan":
        return clamp * (2.0 / math.pi) * torch.atan(s / clamp)
    raise ValueError(f"unknown clamp kind {kind!r}; use 'tanh' or 'atan'")


def _zero_last(module: nn.Module) -> None:
    """Zero the weights and bias of the last Linear/Conv so a fresh coupling is the identity (Glow's init)."""
    last = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    nn.init.zeros_(last.weight)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def conv_subnet(kernel_size: int = 3, hidden_ratio: float = 1.0, zero_init: bool = True) -> SubnetFactory:
    """FastFlow's subnetwork: conv k×k → ReLU → conv k×k, same padding; (N, in, H, W) -> (N, out, H, W).

    hidden channels = max(1, round(in_channels * hidden_ratio)).
    """

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(round(c_in * hidden_ratio)))
        net = nn.Sequential(
            nn.Conv2d(c_in, hidden, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(hidden, c_out, kernel_size, padding=kernel_size // 2),
        )
        if zero_init:
            _zero_last(net)
        return net

    return make


def mlp_subnet(hidden_ratio: float = 2.0, zero_init: bool = True) -> SubnetFactory:
    """CFlow's subnetwork: Linear → ReLU → Linear on fibers; (N, in) -> (N, out)."""

    def make(c_in: int, c_out: int) -> nn.Module:
        hidden = max(1, int(round(c_in * hidden_ratio)))
        net = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))
        if zero_init:
            _zero_last(net)
        return net

    return make


class AffineCoupling(nn.Module):
    """One affine coupling then a fixed channel permutation.

    Split x (N, C, *S) into x1 (first C//2 channels) and x2 (the rest); (s, t) = subnet([x1, c]);
    y2 = x2 · exp(soft_clamp(s)) + t; y = permute([x1, y2]). log_det (N, *S) = Σ_channels soft_clamp(s).
    The permutation (a seeded random one) mixes which channels are transformed by the next block.
    """

    def __init__(self, channels: int, subnet: SubnetFactory, *, cond_channels: int = 0, clamp: float = 2.0,
                 clamp_kind: str = "tanh", permute_seed: int | None = 0):
        super().__init__()
        if channels < 2:
            raise ValueError("a coupling block needs at least 2 channels")
        soft_clamp(torch.zeros(1), 1.0, clamp_kind)  # validates the kind early
        self.channels = channels
        self.cond_channels = cond_channels
        self.clamp = float(clamp)
        self.clamp_kind = clamp_kind
        self.c1 = channels // 2
        self.c2 = channels - self.c1
        self.subnet = subnet(self.c1 + cond_channels, 2 * self.c2)
        if permute_seed is None:
            perm = torch.arange(channels)
        else:
            perm = torch.randperm(channels, generator=torch.Generator().manual_seed(int(permute_seed)))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def _scale_shift(self, x1: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cond_channels:
            if cond is None:
                raise ValueError("this coupling block is conditional: pass cond")
            x1 = torch.cat([x1, cond.to(x1.dtype)], 1)
        h = self.subnet(x1)
        s, t = h[:, : self.c2], h[:, self.c2:]
        return soft_clamp(s, self.clamp, self.clamp_kind), t

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, *S) -> (y (N, C, *S), log_det (N, *S))."""
        x1, x2 = x[:, : self.c1], x[:, self.c1:]
        s, t = self._scale_shift(x1, cond)
        y = torch.cat([x1, x2 * torch.exp(s) + t], 1)
        return y[:, self.perm], s.sum(1)

    def inverse(self, y: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """y (N, C, *S) -> x (N, C, *S), the exact inverse of forward."""
        y = y[:, self.inv_perm]
        y1, y2 = y[:, : self.c1], y[:, self.c1:]
        s, t = self._scale_shift(y1, cond)
        return torch.cat([y1, (y2 - t) * torch.exp(-s)], 1)


class CouplingFlow(nn.Module):
    """A stack of AffineCoupling blocks; block k gets subnet `subnets[k % len(subnets)]` and permutation seed
    `seed + k`, so e.g. `[conv_subnet(3), conv_subnet(1)]` alternates 3×3 and 1×1 steps (FastFlow)."""

    def __init__(self, channels: int, n_blocks: int, subnets: list[SubnetFactory], *, cond_channels: int = 0,
                 clamp: float = 2.0, clamp_kind: str = "tanh", seed: int = 0):
        super().__init__()
        if not subnets:
            raise ValueError("give at least one subnet constructor")
        self.channels = channels
        self.cond_channels = cond_channels
        self.blocks = nn.ModuleList(
            AffineCoupling(channels, subnets[k % len(subnets)], cond_channels=cond_channels, clamp=clamp,
                           clamp_kind=clamp_kind, permute_seed=seed + k)
            for k in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, C, *S) -> (z (N, C, *S), log_det (N, *S)) summed over blocks."""
        log_det = torch.zeros((x.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x, ld = block(x, cond)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, z: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z (N, C, *S) -> x (N, C, *S)."""
        for block in reversed(self.blocks):
            z = block.inverse(z, cond)
        return z


def log_likelihood(z: torch.Tensor, log_det: torch.Tensor, per_dim: bool = True) -> torch.Tensor:
    """Per-position log p(x) under a standard-normal base: z (N, C, *S), log_det (N, *S) -> (N, *S).

    log p = −½ Σ_c z² − (C/2) log 2π + log_det; divided by C when `per_dim` (bits-per-dim style, keeps
    losses of different widths comparable and moderate).
    """
    c = z.shape[1]
    lp = -0.5 * (z * z).sum(1) - 0.5 * c * _LOG_2PI + log_det
    return lp / c if per_dim else lp


def gaussian_nll(z: torch.Tensor, log_det: torch.Tensor, per_dim: bool = True) -> torch.Tensor:
    """Per-position negative log-likelihood, (N, *S); see log_likelihood."""
    return -log_likelihood(z, log_det, per_dim)


def positional_encoding_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """2D sinusoidal positional encoding (CFLOW-AD's condition), (dim, height, width) float32.

    The first dim/2 channels encode the column, the rest the row, each as interleaved sin/cos pairs with
    frequencies 1 / 10000^(2i / (dim/2)) (Transformer-style). `dim` must be a multiple of 4.
    """
    if dim % 4:
        raise ValueError(f"positional encoding dim must be a multiple of 4, got {dim}")
    half = dim // 2
    freq = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(10000.0) / half))  # (half/2,)
    pos_w = torch.arange(width, dtype=torch.float64)[:, None] * freq  # (W, half/2)
    pos_h = torch.arange(height, dtype=torch.float64)[:, None] * freq  # (H, half/2)
    pe = torch.zeros(dim, height, width, dtype=torch.float64)
    pe[0:half:2] = torch.sin(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[1:half:2] = torch.cos(pos_w).T[:, None, :].expand(-1, height, -1)
    pe[half::2] = torch.sin(pos_h).T[:, :, None].expand(-1, -1, width)
    pe[half + 1::2] = torch.cos(pos_h).T[:, :, None].expand(-1, -1, width)
    return pe.float()


def flows_per_scale(channels: list[int], n_blocks: int, subnets: list[SubnetFactory], *, cond_channels: int = 0,
                    clamp: float = 2.0, seed: int = 0, device: str = "cpu") -> nn.ModuleList:
    """One CouplingFlow per feature scale (channels[l] wide), initialised from `seed` (weights and permutations)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flows = nn.ModuleList(
            CouplingFlow(c, n_blocks, subnets, cond_channels=cond_channels, clamp=clamp, seed=seed * 1000 + 100 * i)
            for i, c in enumerate(channels)
        )
    return flows.to(device)
