"""Reverse Distillation (Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022).

A frozen pretrained encoder (teacher) gives multi-scale features; a trainable one-class bottleneck
embedding (OCBE) fuses them and squeezes them into a compact low-resolution code, and a trainable
decoder (student) mirrors the encoder in reverse, reconstructing the teacher's features from that
code. Trained on normal images only, the decoder cannot rebuild the teacher's view of anomalies.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress, no_progress
from engine.backbones import stage_info
from engine.components.anomaly_map import gaussian_blur, upsample
from engine.components.features import extract_features
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.device import autocast, batch_size
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (stride 1 or 2) + BatchNorm + ReLU: (B, cin, h, w) -> (B, cout, h / stride, w / stride)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand) with a projection shortcut when shape changes.

    (B, cin, h, w) -> (B, cout, h / stride, w / stride).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, width: int | None = None):
        super().__init__()
        w = width or max(16, cout // 4)
        self.body = nn.Sequential(
            nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = (nn.Identity() if stride == 1 and cin == cout else
                      nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class UpBlock(nn.Module):
    """Decoder residual block that doubles the resolution with transposed convolutions (the paper's de-ResBlock).

    (B, cin, h, w) -> (B, cout, 2h, 2w).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        w = max(16, cout // 2)
        self.body = nn.Sequential(
            nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, w, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.short = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.short(x))


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion (MFF) then one-class embedding (OCE) residual blocks.

    MFF: every encoder map but the deepest is brought to the deepest map's resolution by stride-2
    3x3 conv-BN-ReLU steps and to its channel count; all are concatenated. OCE: `blocks` bottlenecks,
    the first with stride 2, down to the compact code.
    forward(list of (B, C_i, h_i, w_i), shallow to deep) -> (B, code_channels, h_last / 2, w_last / 2).
    """

    def __init__(self, channels: list[int], strides: list[int], code_channels: int, blocks: int = 3):
        super().__init__()
        c_last, s_last = channels[-1], strides[-1]
        self.down = nn.ModuleList()
        for c, s in zip(channels[:-1], strides[:-1], strict=True):
            steps, cur = [], c
            while s < s_last:
                steps.append(_conv_bn_relu(cur, c_last, 2))
                cur, s = c_last, s * 2
            self.down.append(nn.Sequential(*steps))
        fused = c_last * len(channels)
        self.oce = nn.Sequential(Bottleneck(fused, code_channels, stride=2),
                                 *[Bottleneck(code_channels, code_channels) for _ in range(blocks - 1)])

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[-1].shape[-2:]
        parts = []
        for d, f in zip(self.down, feats[:-1], strict=True):
            g = d(f)
            if g.shape[-2:] != size:
                g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
            parts.append(g)
        return self.oce(torch.cat([*parts, feats[-1]], 1))


class ReverseDecoder(nn.Module):
    """Student decoder mirroring the encoder stages from deep to shallow.

    Each stage: an UpBlock (x2 resolution) to `width_i` channels, `blocks - 1` residual bottlenecks, then a
    linear 1x1 projection to the encoder stage's channels (EfficientNet stage outputs are signed, unlike
    ResNet's post-ReLU outputs, so the last layer has no ReLU).
    forward(code (B, C_code, h, w), sizes [(h_i, w_i)] shallow to deep) -> list of (B, C_i, h_i, w_i) shallow to deep.
    """

    def __init__(self, code_channels: int, channels: list[int], widths: list[int], blocks: int = 2):
        super().__init__()
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        cin = code_channels
        for c, w in zip(reversed(channels), reversed(widths), strict=True):
            self.stages.append(nn.Sequential(UpBlock(cin, w), *[Bottleneck(w, w) for _ in range(blocks - 1)]))
            self.heads.append(nn.Conv2d(w, c, 1))
            cin = w

    def forward(self, code: torch.Tensor, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        outs = []
        x = code
        for stage, head, size in zip(self.stages, self.heads, reversed(sizes), strict=True):
            x = stage(x)
            if tuple(x.shape[-2:]) != tuple(size):
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            outs.append(head(x))
        return outs[::-1]


class ReverseStudent(nn.Module):
    """OCBE + decoder: teacher features (list, shallow to deep) -> reconstructed features of the same shapes."""

    def __init__(self, channels: list[int], strides: list[int], code_channels: int, widths: list[int],
                 oce_blocks: int, decoder_blocks: int):
        super().__init__()
        self.bottleneck = OneClassBottleneck(channels, strides, code_channels, oce_blocks)
        self.decoder = ReverseDecoder(code_channels, channels, widths, decoder_blocks)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decoder(self.bottleneck(feats), [tuple(f.shape[-2:]) for f in feats])


def cosine_distance_map(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """1 − cosine similarity over channels, (B, C, h, w) x2 -> (B, h, w)."""
    return 1.0 - F.cosine_similarity(t, s, dim=1, eps=1e-6)


@register(
    family="teacher_student", name="reverse_distillation", localises=True, paper="Deng & Li, CVPR 2022",
    summary="A decoder rebuilds a frozen encoder's multi-scale features from a compact one-class embedding; "
            "anomalies are what it cannot rebuild.",
    notes="Encoder is EfficientNet-Lite0 (stages blocks.1/2/4, strides 4/8/16) instead of WideResNet-50 "
          "layer1–3; OCBE and decoder are scaled to its channel widths, and each decoder stage ends in a linear "
          "1x1 projection because EfficientNet stage outputs are signed (ResNet's are post-ReLU). Loss is the "
          "paper's per-position 1 − cos averaged over positions and summed over scales (the official code "
          "flattens each map into one vector instead). Adam-style optimiser (AdamW, lr 5e-3, betas 0.5/0.999 as "
          "in the paper) with early stopping, and far fewer epochs than the paper's 200 on CPU. Map: sum of "
          "upsampled 1 − cos maps, Gaussian σ = 4; image score: the map's maximum, as in the paper.",
    faithful=True, trained=True, cpu_bf16=True,
    presets={"test": {"epochs": 15},
             "fast": {"max_steps": 60, "epochs": 10},
             "quality": {"max_steps": 250, "epochs": 100, "patience": 15}},
)
class ReverseDistillation(BaseDetector):
    """Teacher encoder (frozen, cached features) -> OCBE -> decoder student; per-scale 1 − cos discrepancy."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), code_channels: int = 256,
                 decoder_widths: tuple[int, ...] = (48, 80, 224), oce_blocks: int = 3, decoder_blocks: int = 2,
                 epochs: int = 10, lr: float = 5e-3, batch_size: int = 8, patience: int = 5, sigma: float = 4.0,
                 max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.code_channels = code_channels
        self.decoder_widths = tuple(decoder_widths)
        self.oce_blocks = oce_blocks
        self.decoder_blocks = decoder_blocks
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patience = patience
        self.sigma = sigma
        self.max_steps = max_steps
        self.seed = seed

    def _build(self) -> ReverseStudent:
        """The trainable OCBE + decoder, initialised from `seed` only."""
        by_name = {s.name: s for s in stage_info(self.backbone)}
        channels = [by_name[layer].channels for layer in self.layers]
        strides = [by_name[layer].stride for layer in self.layers]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return ReverseStudent(channels, strides, self.code_channels, list(self.decoder_widths),
                                  self.oce_blocks, self.decoder_blocks)

    def _teacher(self, images: ImageSet, progress: Progress = no_progress) -> list[torch.Tensor]:
        """Frozen encoder features per layer, (N, C_l, h_l, w_l), from the shared cache."""
        return extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                device=self.device_, progress=progress)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        teacher = [t.to(self.device_) for t in self._teacher(train, progress)]
        self.student_ = self._build().to(self.device_)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            t = [f[idx.to(self.device_)] for f in teacher]
            s = self.student_(t)
            return sum(cosine_distance_map(a, b.float()).mean() for a, b in zip(t, s, strict=True))

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                          patience=self.patience,
                          seed=self.seed)
        obj = Objective(self.student_.parameters(), loss, name="loss", betas=(0.5, 0.999))
        res = train_loop(obj, len(train), cfg, modules=[self.student_], device=self.device_, progress=progress)
        self.history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _predict(self, images: ImageSet) -> Prediction:
        teacher = self._teacher(images)
        self.student_.eval()
        amaps = []
        bs = batch_size(self.device_)
        with torch.no_grad(), autocast(self.device_):
            for s in range(0, len(images), bs):
                t = [f[s:s + bs].to(self.device_) for f in teacher]
                rec = self.student_(t)
                amap = sum(upsample(cosine_distance_map(a, b.float()).float(), images.size)
                           for a, b in zip(t, rec, strict=True))
                amaps.append(amap.cpu())
        amap = gaussian_blur(torch.cat(amaps), self.sigma)
        return Prediction(scores=amap.flatten(1).amax(1), maps=amap)

    def _state(self) -> dict[str, torch.Tensor]:
        return module_state("student", self.student_)

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.student_ = self._build()
        load_module_state("student", self.student_, tensors)
        self.student_.to(self.device_).eval()
