"""EfficientNet-Lite0 written out in plain torch, for the bundled ImageNet weights (DESIGN §4).

timm builds the same network, but importing timm pulls in torchvision, whose ops import `torch._dynamo` and sympy:
about 195 MB of resident memory and 3 s of start-up in every process that only needs the default backbone's
features. This module has timm's parameter names and order (`conv_stem`, `bn1`, `blocks.i.j.*`, `conv_head`,
`bn2`, `classifier`), so the bundled weights load onto either, and the same operations in the same order, so its
features equal timm's `features_only` ones to the bit (tested). A random Lite0 (a student trained from scratch) is
built here too, with EfficientNet's own initialisation (`init_random_`, the scheme timm follows; not timm's random
stream); other backbones and hub weights still go through timm.

Architecture (Tan & Le 2019, the Lite variant): a 3×3 stride-2 stem to 32 channels; seven stages of depthwise /
inverted-residual blocks (no squeeze-excitation), ReLU6 everywhere, BatchNorm eps 1e-5, symmetric k//2 padding;
a 1×1 head to 1280 channels and a 1000-way classifier (kept only so the state_dict is the whole model's).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# (kernel, stride, expansion, out channels, repeats) per stage; stage 0 is the depthwise-separable block.
STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM = 32
HEAD = 1280
# timm's features_only stages: (module name, channels, stride).
FEATURE_STAGES: tuple[tuple[str, int, int], ...] = (
    ("blocks.0", 16, 2), ("blocks.1", 24, 4), ("blocks.2", 40, 8), ("blocks.4", 112, 16), ("blocks.6", 320, 32),
)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False)


def _bn_relu6(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.relu6(bn(x), inplace=True)


class DepthwiseSeparable(nn.Module):
    """Stage 0: depthwise k×k + BN + ReLU6, pointwise 1×1 + BN. (B, cin, H, W) -> (B, cout, H/s, W/s)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int):
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(_bn_relu6(self.bn1, self.conv_dw(x))))
        return y + x if self.skip else y


class InvertedResidual(nn.Module):
    """Expand 1×1 + BN + ReLU6, depthwise k×k + BN + ReLU6, project 1×1 + BN; residual when the shape holds."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _bn_relu6(self.bn1, self.conv_pw(x))
        y = self.bn3(self.conv_pwl(_bn_relu6(self.bn2, self.conv_dw(y))))
        return y + x if self.skip else y


def _stage(i: int, cin: int) -> nn.Sequential:
    k, stride, e, cout, n = STAGES[i]
    blocks: list[nn.Module] = []
    for j in range(n):
        s = stride if j == 0 else 1
        blocks.append(DepthwiseSeparable(cin, cout, k, s) if e == 1 else InvertedResidual(cin, cout, k, s, e))
        cin = cout
    return nn.Sequential(*blocks)


class EfficientNetLite0(nn.Module):
    """The whole classifier (parameter names and order as timm's `efficientnet_lite0`).

    forward(x: (B, 3, H, W) normalised) -> (B, 1000) logits. Built for its state_dict's keys; never run here.
    """

    def __init__(self, n_stages: int = len(STAGES), head: bool = True):
        super().__init__()
        self.conv_stem = _conv(3, STEM, 3, 2)
        self.bn1 = nn.BatchNorm2d(STEM)
        stages, cin = [], STEM
        for i in range(n_stages):
            stages.append(_stage(i, cin))
            cin = STAGES[i][3]
        self.blocks = nn.Sequential(*stages)
        if head:
            self.conv_head = _conv(cin, HEAD, 1)
            self.bn2 = nn.BatchNorm2d(HEAD)
            self.classifier = nn.Linear(HEAD, 1000)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return _bn_relu6(self.bn1, self.conv_stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _bn_relu6(self.bn2, self.conv_head(self.blocks(self.stem(x))))
        return self.classifier(x.mean((2, 3)))


class EfficientNetLite0Features(EfficientNetLite0):
    """The stages up to the deepest requested one, as timm's `features_only=True, out_indices=...`.

    forward(x: (B, 3, H, W) normalised) -> list of the requested stages' maps, shallow to deep;
    stage i of FEATURE_STAGES is (B, C_i, H / s_i, W / s_i) (sizes rounded up at each stride-2 step).
    """

    def __init__(self, out_indices: tuple[int, ...]):
        blocks = [int(FEATURE_STAGES[i][0].split(".")[1]) for i in out_indices]
        super().__init__(n_stages=max(blocks) + 1, head=False)
        self._take = set(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        x = self.stem(x)
        out = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in self._take:
                out.append(x)
        return out


def init_random_(model: nn.Module) -> nn.Module:
    """EfficientNet's random initialisation (the TensorFlow reference's, which timm follows), in place, module by
    module in order; returns `model`. Convolution weights ~ N(0, 2 / fan_out), fan_out = k_h·k_w·out_channels /
    groups; BatchNorm weight 1, bias 0; Linear weight ~ U(±1 / sqrt(out_features)), bias 0. Draws from torch's
    global generator (seed it first for a reproducible network)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return model
