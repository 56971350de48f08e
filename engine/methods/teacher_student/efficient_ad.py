"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies",
WACV 2024), small variant (PDN-S).

Shapes (H x W input, o = pdn_out_size(H) ≈ H/4 - 8, C = teacher channels):
    PDN teacher   (N, 3, H, W) -> (N, C, o_h, o_w)       valid convs, stride 4, receptive field 33 px
    PDN student   (N, 3, H, W) -> (N, 2C, o_h, o_w)      first C: imitates the teacher, last C: the autoencoder
    autoencoder   (N, 3, H, W) -> (N, C, o_h, o_w)       1x1 bottleneck (logical / global anomalies)
    maps          (N, o_h + 8, o_w + 8)                  padded by 4 cells (16 px) per side = input grid / 4
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress, to_float_images
from engine.backbones import IMAGENET_MEAN, IMAGENET_STD
from engine.components.anomaly_map import local_average, resample_cells
from engine.components.features import extract_features
from engine.components.train_loop import Objective, TrainConfig, split_indices, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# Bilinear sizes of the paper's decoder for a 256 px input (Table 8), scaled to other input sizes.
_DECODER_SIZES_256 = (3, 8, 15, 32, 63, 127)
_PAD = 4  # output cells lost per side by the valid convolutions (16 px of a 33 px receptive field)


def pdn_out_size(n: int) -> int:
    """Output length of PDN-S along a side of `n` input pixels (valid convs): 256 -> 56, 128 -> 24."""
    return ((n - 3) // 2 - 3) // 2 - 2 - 3


class PDN(nn.Module):
    """Patch description network, small (PDN-S, paper Table 6), without padding.

    (B, 3, H, W) float in [0, 1] -> (B, out_channels, pdn_out_size(H), pdn_out_size(W)).
    `width` is the first conv's channels (paper: 128); the two middle convs have 2·width (paper: 256).
    ImageNet normalisation of the input happens inside.
    """

    def __init__(self, out_channels: int, width: int = 128):
        super().__init__()
        w2 = 2 * width
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(width, w2, 4), nn.ReLU(inplace=True), nn.AvgPool2d(2, 2),
            nn.Conv2d(w2, w2, 3), nn.ReLU(inplace=True),
            nn.Conv2d(w2, out_channels, 4),
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, out_channels, o_h, o_w)."""
        return self.net((x - self.mean) / self.std)


class EADAutoencoder(nn.Module):
    """The paper's autoencoder (Table 8) generalised to any input size.

    Encoder: five 4x4 stride-2 convs (32, 32, 64, 64, 64 channels at `width`=64), then one conv whose kernel
    covers the remaining map (8x8 at 256 px) -> (B, width, 1, 1). Decoder: bilinear resize to the paper's sizes
    scaled by H/256, each followed by a 4x4 conv (padding 2) + ReLU + dropout 0.2, a final resize to the PDN's
    output grid and two 3x3 convs. (B, 3, H, W) in [0, 1] -> (B, out_channels, o_h, o_w).
    """

    def __init__(self, out_channels: int, image_size: tuple[int, int], width: int = 64):
        super().__init__()
        h, w = image_size
        half = max(1, width // 2)
        chans = [3, half, half, width, width, width]
        enc: list[nn.Module] = []
        for i in range(5):
            enc += [nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        rh, rw = h, w
        for _ in range(5):
            rh, rw = (rh + 2 - 4) // 2 + 1, (rw + 2 - 4) // 2 + 1
        if rh < 1 or rw < 1:
            raise ValueError(f"image size {image_size} is too small for the EfficientAD autoencoder")
        enc.append(nn.Conv2d(width, width, (rh, rw)))
        self.encoder = nn.Sequential(*enc)
        self.sizes = [(max(1, round(s * h / 256)), max(1, round(s * w / 256))) for s in _DECODER_SIZES_256]
        self.out_size = (pdn_out_size(h), pdn_out_size(w))
        self.dec = nn.ModuleList([nn.Conv2d(width, width, 4, padding=2) for _ in self.sizes])
        self.drop = nn.Dropout(0.2)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, out_channels, 3, padding=1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, out_channels, o_h, o_w)."""
        z = self.encoder((x - self.mean) / self.std)
        for size, conv in zip(self.sizes, self.dec, strict=True):
            z = self.drop(F.relu(conv(F.interpolate(z, size=size, mode="bilinear", align_corners=False))))
        z = F.interpolate(z, size=self.out_size, mode="bilinear", align_corners=False)
        return self.head(z)


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Paper's hard-feature loss: mean of the squared differences at or above their q-quantile.

    teacher, student: (B, C, h, w) -> scalar. Gradients flow only through the selected (hardest) elements.
    """
    d = (teacher - student).pow(2)
    flat = d.flatten()
    k = max(1, int(math.ceil((1.0 - q) * flat.numel())))
    d_hard = torch.topk(flat.detach(), k, sorted=False).values.min()
    return d[d >= d_hard].mean()


def quantile_normalise(m: torch.Tensor, q_a: torch.Tensor | float, q_b: torch.Tensor | float) -> torch.Tensor:
    """Paper's map normalisation: the held-out q_a quantile -> 0, the q_b quantile -> 0.1. Any shape."""
    return 0.1 * (m - q_a) / max(float(q_b) - float(q_a), 1e-12)


def colour_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of brightness, contrast, saturation with a factor in [0.8, 1.2] per image (paper §3.3).

    (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1].
    """
    out = []
    for img in x:
        op = int(torch.randint(0, 3, (), generator=generator))
        f = 0.8 + 0.4 * float(torch.rand((), generator=generator))
        if op == 0:
            ref = torch.zeros_like(img)
        else:
            grey = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2])[None]
            ref = grey.mean().expand_as(img) if op == 1 else grey.expand_as(img)
        out.append((ref + f * (img - ref)).clamp(0, 1))
    return torch.stack(out)


@register(
    family="teacher_student", name="efficient_ad", localises=True, trained=True,
    paper="Batzner et al., WACV 2024",
    summary="Small patch description networks: a student imitates a distilled teacher (hard-feature loss) and an "
            "autoencoder catches logical anomalies; map = quantile-normalised discrepancies.",
    notes="PDN-S architecture, hard-feature loss (q=0.999), student-half regressing the autoencoder, teacher "
          "channel normalisation and q_a=0.9/q_b=0.995 map normalisation on a held-out slice follow the paper. "
          "Offline, the teacher cannot be distilled from WideResNet-101 on ImageNet: it is distilled from the "
          "bundled ImageNet EfficientNet-Lite0 features blocks.1+blocks.2 (strides 4/8, whose receptive fields "
          "match the PDN's 33 px better than blocks.4: distilling blocks.2+blocks.4 did not converge), "
          "PatchCore's 3x3 local average with zero padding, resized to the PDN's output grid, channel-standardised; "
          "64 channels instead of "
          "384) on the training images only. "
          "The ImageNet penalty on the student is dropped (no ImageNet images). test/fast presets shrink the PDN/AE "
          "widths (16 vs 128/64) and train a few hundred steps with batch 2 instead of 70 000 with batch 1, at "
          "a higher learning rate. Maps are padded by 4 cells "
          "(replicating the border, the paper pads with 0) then resized; score = max of the unpadded map.",
    faithful=False,
    presets={
        "test": {"width": 16, "ae_width": 16, "batch_size": 2, "teacher_epochs": 10, "epochs": 10, "lr": 3e-3,
                 "teacher_lr": 1e-2},
        "fast": {"max_steps": 250, "width": 16, "ae_width": 16, "batch_size": 2, "teacher_epochs": 10, "epochs": 12,
                 "lr": 3e-3, "teacher_lr": 1e-2},
        "quality": {"max_steps": 600, "width": 128, "ae_width": 64, "batch_size": 2, "teacher_epochs": 60,
                    "epochs": 150, "lr": 5e-4, "teacher_lr": 2e-3},
    },
)
class EfficientAD(BaseDetector):
    """EfficientAD-S: PDN teacher (distilled here from backbone features), PDN student, autoencoder.

    Training: (1) distil the teacher onto the standardised backbone features; (2) standardise the teacher's
    channels with the training-set mean/std; (3) train student and autoencoder jointly on
    L = L_hard(T, S_st) + mean((T(aug) − A(aug))²) + mean((A(aug) − S_ae(aug))²). Held-out normal images give
    the quantiles that normalise the two maps; map = mean of both; score = its maximum.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2"), pad: str = "zero", width: int = 128,
                 ae_width: int = 64,
                 teacher_epochs: int = 100, epochs: int = 200, lr: float = 1e-4, teacher_lr: float = 1e-3,
                 batch_size: int = 4, hard_quantile: float = 0.999, q_a: float = 0.9, q_b: float = 0.995,
                 val_fraction: float = 0.1, patience: int = 1000, time_budget_s: float | None = None,
                 max_steps: int | None = None, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.pad = pad
        self.width = width
        self.ae_width = ae_width
        self.teacher_epochs = teacher_epochs
        self.epochs = epochs
        self.lr = lr
        self.teacher_lr = teacher_lr
        self.batch_size = batch_size
        self.hard_quantile = hard_quantile
        self.q_a = q_a
        self.q_b = q_b
        self.val_fraction = val_fraction
        self.patience = patience
        self.time_budget_s = time_budget_s
        self.max_steps = max_steps
        self.seed = seed

    # --- pieces ---------------------------------------------------------------------------------------
    def _targets(self, images: ImageSet, progress: Progress) -> torch.Tensor:
        """Backbone features aligned with the PDN's output cells: (N, C, o_h, o_w), channel-standardised."""
        feats = extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                 device=self.device_, progress=progress)
        h, w = images.size
        oh, ow = pdn_out_size(h), pdn_out_size(w)
        # Resample to the input's stride-4 grid (o + 8 cells), then drop the 4 cells per side that the PDN's
        # valid convolutions never centre on: cell i of the PDN output is centred on pixel 4i + 16.
        grid = (oh + 2 * _PAD, ow + 2 * _PAD)
        t = torch.cat([resample_cells(local_average(f, 3, self.pad), grid) for f in feats], 1)
        t = t[:, :, _PAD:_PAD + oh, _PAD:_PAD + ow]
        mean = t.mean((0, 2, 3), keepdim=True)
        std = t.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        return ((t - mean) / std).contiguous()

    def _cfg(self, epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(max_steps=self.max_steps, epochs=epochs, lr=lr, weight_decay=1e-5,
                           batch_size=self.batch_size,
                           cuda_batch_size=max(self.batch_size, 8), val_fraction=self.val_fraction,
                           patience=self.patience, time_budget_s=self.time_budget_s, seed=self.seed)

    def _teacher_out(self, x: torch.Tensor) -> torch.Tensor:
        """Channel-standardised teacher output: (B, 3, H, W) -> (B, C, o_h, o_w)."""
        return (self.teacher_(x) - self.t_mean_) / self.t_std_

    def _raw_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised (map_st, map_ae), each (B, o_h, o_w), for float images (B, 3, H, W) on the device."""
        c = self.t_mean_.shape[1]
        t = self._teacher_out(x)
        s = self.student_(x)
        a = self.ae_(x)
        return (t - s[:, :c]).pow(2).mean(1), (a - s[:, c:]).pow(2).mean(1)

    def _maps_batched(self, x: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        st, ae = [], []
        for i in range(0, x.shape[0], chunk):
            a, b = self._raw_maps(to_float_images(x[i:i + chunk]).to(self.device_))
            st.append(a.float().cpu())
            ae.append(b.float().cpu())
        return torch.cat(st), torch.cat(ae)

    def _build(self, c: int, size: tuple[int, int]) -> None:
        self.teacher_ = PDN(c, self.width).to(self.device_)
        self.student_ = PDN(2 * c, self.width).to(self.device_)
        self.ae_ = EADAutoencoder(c, size, self.ae_width).to(self.device_)

    # --- contract -------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        h, w = train.size
        if min(pdn_out_size(h), pdn_out_size(w)) < 1:
            raise ValueError(f"EfficientAD needs images of at least 40 px; got {train.size}")
        targets = self._targets(train, progress)
        c = targets.shape[1]
        self.train_size_ = (h, w)
        # Re-seed: building the backbone on a feature-cache miss draws from the global RNG (timm's init).
        torch.manual_seed(self.seed)
        self._build(c, (h, w))
        imgs = train.images  # uint8 on CPU; batches are converted on the fly
        dev = self.device_

        def batch(idx: torch.Tensor) -> torch.Tensor:
            return to_float_images(imgs[idx]).to(dev)

        # (1) distil the teacher (replaces the paper's ImageNet pretraining)
        teacher = self.teacher_

        def teacher_loss(idx: torch.Tensor) -> torch.Tensor:
            return (teacher(batch(idx)) - targets[idx].to(dev)).pow(2).mean()

        progress("teacher", 0.0, {})
        r1 = train_loop(Objective(teacher.parameters(), teacher_loss, name="distillation"), len(train),
                        self._cfg(self.teacher_epochs, self.teacher_lr), modules=[teacher], device=dev,
                        progress=lambda s, f, i: progress("teacher", f, i))
        for p in teacher.parameters():
            p.requires_grad_(False)

        # (2) teacher channel normalisation with the training-set statistics
        with torch.no_grad():
            outs = torch.cat([teacher(batch(torch.arange(i, min(i + 16, len(train)))))
                              for i in range(0, len(train), 16)])
        self.t_mean_ = outs.mean((0, 2, 3), keepdim=True)
        self.t_std_ = outs.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        t_train = (outs - self.t_mean_) / self.t_std_

        # (3) student + autoencoder
        gen = torch.Generator().manual_seed(self.seed + 1)
        student, ae, q = self.student_, self.ae_, self.hard_quantile

        def st_ae_loss(idx: torch.Tensor) -> torch.Tensor:
            x = batch(idx)
            s = student(x)[:, :c]
            loss_st = hard_feature_loss(t_train[idx], s, q)
            x_aug = colour_augment(x, gen)
            with torch.no_grad():
                t_aug = self._teacher_out(x_aug)
            a = ae(x_aug)
            s_ae = student(x_aug)[:, c:]
            return loss_st + (t_aug - a).pow(2).mean() + (a - s_ae).pow(2).mean()

        progress("train", 0.0, {})
        r2 = train_loop(Objective(list(student.parameters()) + list(ae.parameters()), st_ae_loss, name="loss"),
                        len(train), self._cfg(self.epochs, self.lr), modules=[student, ae], device=dev,
                        progress=progress)
        self.history_ = {"teacher": r1.history, "student": r2.history}
        self.run_notes_ = {"teacher distillation": r1.summary(), "training": r2.summary()}

        # (4) quantiles of both maps on the held-out normal slice (the train_loop's validation slice)
        _, val_idx = split_indices(len(train), self.val_fraction, torch.Generator().manual_seed(self.seed))
        if len(val_idx) == 0:
            val_idx = torch.arange(len(train))
            self.run_notes_["quantiles"] = ("fewer than 4 training images: map quantiles estimated on the "
                                            "training images themselves (no held-out slice)")
        with torch.no_grad():
            st, aem = self._maps_batched(imgs[val_idx])
        self._set_quantiles(st, aem)

    def _set_quantiles(self, st: torch.Tensor, ae: torch.Tensor) -> None:
        """st, ae: (N, o_h, o_w) raw maps of held-out normal images."""
        qs = torch.tensor([self.q_a, self.q_b], dtype=torch.float64)
        self.qst_ = torch.quantile(st.double().flatten(), qs).float()
        self.qae_ = torch.quantile(ae.double().flatten(), qs).float()

    def normalised_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantile-normalised (map_st, map_ae), each (N, o_h, o_w), for images (N, 3, H, W) uint8 or float."""
        with torch.no_grad():
            st, ae = self._maps_batched(x)
        return (quantile_normalise(st, self.qst_[0], self.qst_[1]),
                quantile_normalise(ae, self.qae_[0], self.qae_[1]))

    def _predict(self, images: ImageSet) -> Prediction:
        x = images.images
        if images.size != self.train_size_:  # the autoencoder's bottleneck is sized for the training images
            x = F.interpolate(to_float_images(x), size=self.train_size_, mode="bilinear", align_corners=False)
        st, ae = self.normalised_maps(x)
        m = 0.5 * st + 0.5 * ae  # (N, o_h, o_w)
        scores = m.flatten(1).amax(1)
        maps = F.pad(m[:, None], (_PAD, _PAD, _PAD, _PAD), mode="replicate")[:, 0]  # stride-4 input grid
        return Prediction(scores=scores, maps=maps)

    def _state(self) -> dict[str, torch.Tensor]:
        return {**module_state("teacher", self.teacher_), **module_state("student", self.student_),
                **module_state("ae", self.ae_), "t_mean": self.t_mean_, "t_std": self.t_std_,
                "qst": self.qst_, "qae": self.qae_}

    def _extra(self) -> dict[str, Any]:
        return {"channels": int(self.t_mean_.shape[1]), "train_size": list(self.train_size_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.train_size_ = (int(extra["train_size"][0]), int(extra["train_size"][1]))
        self._build(int(extra["channels"]), self.train_size_)
        for name, mod in (("teacher", self.teacher_), ("student", self.student_), ("ae", self.ae_)):
            load_module_state(name, mod, tensors)
            mod.eval()
        self.t_mean_ = tensors["t_mean"].to(self.device_)
        self.t_std_ = tensors["t_std"].to(self.device_)
        self.qst_, self.qae_ = tensors["qst"], tensors["qae"]
