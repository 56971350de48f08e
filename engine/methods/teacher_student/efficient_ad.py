"""EfficientAD (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies",
WACV 2024): EfficientAD-S (PDN-S) and EfficientAD-M (PDN-M).

Shapes (H x W input, o = pdn_out_size(H) ≈ H/4 - 8, C = teacher channels):
    PDN teacher   (N, 3, H, W) -> (N, C, o_h, o_w)       valid convs, stride 4, receptive field 33 px (S and M)
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

from engine.api import ConfigError, ImageSet, Prediction, Progress, to_float_images
from engine.backbones import IMAGENET_MEAN, IMAGENET_STD
from engine.components.anomaly_map import local_average, resample_cells
from engine.components.features import extract_features
from engine.components.nets import Dropout
from engine.components.synthetic_anomalies import default_source
from engine.components.train_loop import Objective, TrainConfig, split_indices, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

# Bilinear sizes of the paper's decoder for a 256 px input (Table 8), scaled to other input sizes.
_DECODER_SIZES_256 = (3, 8, 15, 32, 63, 127)
_PAD = 4  # output cells lost per side by the valid convolutions (16 px of a 33 px receptive field)
# The paper's training (Sec. 4): 70 000 steps of batch 1, Adam lr 1e-4 (weight decay 1e-5), ×0.1 after 95 % of them.
PAPER_STEPS = 70_000
PAPER_LR_MILESTONES = (0.95,)
PDN_WIDTHS = {"small": 128, "medium": 256}  # first conv's channels of PDN-S / PDN-M (Tables 6 and 7)


def pdn_out_size(n: int) -> int:
    """Output length of PDN-S along a side of `n` input pixels (valid convs): 256 -> 56, 128 -> 24."""
    return ((n - 3) // 2 - 3) // 2 - 2 - 3


class PDN(nn.Module):
    """Patch description network, small (PDN-S, paper Table 6) or medium (PDN-M, Table 7), without padding.

    (B, 3, H, W) float in [0, 1] -> (B, out_channels, pdn_out_size(H), pdn_out_size(W)).
    `width` is the first conv's channels (paper: 128 for S, 256 for M); the later hidden convs have 2·width.
    S: Conv4 w, pool, Conv4 2w, pool, Conv3 2w, Conv4 out. M: Conv4 w, pool, Conv4 2w, pool, Conv1 2w, Conv3 2w,
    Conv4 out, Conv1 out. ReLU after every conv but the last; 2x2 average pools of stride 2.
    ImageNet normalisation of the input happens inside.
    """

    def __init__(self, out_channels: int, width: int = 128, variant: str = "small"):
        super().__init__()
        w2 = 2 * width
        relu = nn.ReLU
        # built in layer order: the seeded initialisation draws the weights in this order
        stem = [nn.Conv2d(3, width, 4), relu(inplace=True), nn.AvgPool2d(2, 2),
                nn.Conv2d(width, w2, 4), relu(inplace=True), nn.AvgPool2d(2, 2)]
        head: list[nn.Module]
        if variant == "small":
            head = [nn.Conv2d(w2, w2, 3), relu(inplace=True), nn.Conv2d(w2, out_channels, 4)]
        elif variant == "medium":
            head = [nn.Conv2d(w2, w2, 1), relu(inplace=True), nn.Conv2d(w2, w2, 3), relu(inplace=True),
                    nn.Conv2d(w2, out_channels, 4), relu(inplace=True), nn.Conv2d(out_channels, out_channels, 1)]
        else:
            raise ConfigError(f"efficient_ad.variant must be 'small' or 'medium', got {variant!r}")
        self.net = nn.Sequential(*stem, *head)
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
        self.drop = Dropout(0.2)
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


def student_loss(teacher: torch.Tensor, student: torch.Tensor, student_on_penalty: torch.Tensor,
                 q: float = 0.999) -> torch.Tensor:
    """The paper's L_ST = L_hard(T(I), S(I)) + mean(S(P)²): the hard-feature loss on a training image plus the
    penalty on the student's output for an ImageNet image P (here: a bundled stand-in picture).

    teacher, student: (B, C, h, w); student_on_penalty: (B', C, h', w') (the student's teacher-imitating channels).
    """
    return hard_feature_loss(teacher, student, q) + student_on_penalty.pow(2).mean()


def penalty_images(size: tuple[int, int], generator: torch.Generator, n: int, grey_prob: float = 0.3) -> torch.Tensor:
    """n stand-in "ImageNet" images for the penalty: scikit-image's bundled photographs resized to twice the
    larger side, converted to greyscale with probability grey_prob and centre-cropped to `size` (the paper's
    transform of its ImageNet images). (n, 3, h, w) float in [0, 1]."""
    h, w = size
    src = default_source(2 * max(h, w))
    idx = torch.randint(0, src.shape[0], (n,), generator=generator)
    grey = torch.rand(n, generator=generator) < grey_prob
    side = src.shape[-1]
    y0, x0 = (side - h) // 2, (side - w) // 2
    x = src[idx, :, y0:y0 + h, x0:x0 + w]
    lum = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None].expand_as(x)
    return torch.where(grey[:, None, None, None], lum, x).contiguous()


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
    family="teacher_student", name="efficient_ad", localises=True, trained=True, cpu_bf16=True,
    paper="Batzner et al., WACV 2024",
    summary="Small patch description networks: a student imitates a distilled teacher (hard-feature loss) and an "
            "autoencoder catches logical anomalies; map = quantile-normalised discrepancies.",
    notes="Follows the paper: PDN-S (`variant='medium'`: PDN-M) at its widths (128/256/256, M: 256/512/512), "
          "without padding as the reference implementations; the autoencoder (32-32-64-64-64-64 encoder, 8 "
          "bilinear/conv decoder stages, dropout 0.2); hard-feature loss (q = 0.999) plus the penalty mean(S(P)²) "
          "on an out-of-distribution image P per step; the autoencoder and the student's second half trained on "
          "colour-augmented images; teacher channel normalisation; 70 000 steps of batch 1, Adam lr 1e-4 "
          "(weight decay 1e-5), ×0.1 after 95 %; maps quantile-normalised (q_a = 0.9 -> 0, q_b = 0.995 -> 0.1) on "
          "a held-out 10 % of the training images, averaged, padded by 4 cells and resized; score = max of "
          "the map. Offline: the penalty images are scikit-image's bundled photographs (astronaut, coffee, "
          "moon, ...: resized to 2x, greyscale with p = 0.3, centre-cropped, as the paper's ImageNet images) "
          "instead of ImageNet; the teacher cannot be distilled from WideResNet-101 on ImageNet, so it is "
          "distilled on the training images from the bundled ImageNet EfficientNet-Lite0 (blocks.1+blocks.2, "
          "strides 4/8, 3x3 local average, resized to the PDN's grid, channel-standardised: 64 output channels "
          "instead of 384; 60 epochs, batch 8, lr 2e-3). fast (reduced): widths 16 (PDN and autoencoder), "
          "batch 2, at most 250 steps at lr 3e-3 instead of 70 000 at 1e-4. Maps are padded by replicating the "
          "border cells (the reference code pads zeros: at 128 px that puts 44 % of the pixels at the normal "
          "q_a level).",
    presets={
        "test": {"width": 16, "ae_width": 16, "batch_size": 2, "teacher_batch_size": 2, "teacher_epochs": 10,
                 "epochs": 10, "max_steps": 250, "lr": 3e-3, "teacher_lr": 1e-2},
        "fast": {"width": 16, "ae_width": 16, "batch_size": 2, "teacher_batch_size": 2, "teacher_epochs": 10,
                 "epochs": 12, "max_steps": 250, "lr": 3e-3, "teacher_lr": 1e-2},
        "quality": {},
    },
    reduced_presets=("test", "fast"),
)
class EfficientAD(BaseDetector):
    """EfficientAD-S/M: PDN teacher (distilled here from backbone features), PDN student, autoencoder.

    Training: (1) distil the teacher onto the standardised backbone features; (2) standardise the teacher's
    channels with the training-set mean/std; (3) train student and autoencoder jointly on
    L = L_hard(T, S_st) + mean(S_st(P)²) + mean((T(aug) − A(aug))²) + mean((A(aug) − S_ae(aug))²), P a penalty
    image. Held-out normal images give the quantiles that normalise the two maps; map = mean of both; score = its
    maximum. Defaults are the paper's configuration.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2"), pad: str = "zero", variant: str = "small",
                 width: int | None = None, ae_width: int = 64, teacher_epochs: int = 60, teacher_lr: float = 2e-3,
                 teacher_batch_size: int = 8, epochs: int = PAPER_STEPS, lr: float = 1e-4,
                 lr_milestones: tuple[float, ...] = PAPER_LR_MILESTONES, batch_size: int = 1,
                 penalty: bool = True, hard_quantile: float = 0.999, q_a: float = 0.9, q_b: float = 0.995,
                 val_fraction: float = 0.1, patience: int = 1_000_000, time_budget_s: float | None = None,
                 max_steps: int | None = PAPER_STEPS, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.pad = pad
        self.variant = variant
        self.width = width
        self.ae_width = ae_width
        self.teacher_epochs = teacher_epochs
        self.teacher_lr = teacher_lr
        self.teacher_batch_size = teacher_batch_size
        self.epochs = epochs
        self.lr = lr
        self.lr_milestones = tuple(lr_milestones)
        self.batch_size = batch_size
        self.penalty = penalty
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

    def _cfg(self, epochs: int, lr: float, batch: int, milestones: tuple[float, ...] = ()) -> TrainConfig:
        # the paper's batch of 1 on CUDA too (its timing and schedule assume it)
        return TrainConfig(max_steps=self.max_steps, epochs=epochs, lr=lr, weight_decay=1e-5, batch_size=batch,
                           cuda_batch_size=batch, val_fraction=self.val_fraction, patience=self.patience,
                           time_budget_s=self.time_budget_s, grad_clip=None, lr_milestones=milestones,
                           seed=self.seed)

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
        if self.variant not in PDN_WIDTHS:
            raise ConfigError(f"efficient_ad.variant must be 'small' or 'medium', got {self.variant!r}")
        width = self.width or PDN_WIDTHS[self.variant]
        self.teacher_ = PDN(c, width, self.variant).to(self.device_)
        self.student_ = PDN(2 * c, width, self.variant).to(self.device_)
        self.ae_ = EADAutoencoder(c, size, self.ae_width).to(self.device_)

    # --- contract -------------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        h, w = train.size
        if min(pdn_out_size(h), pdn_out_size(w)) < 1:
            raise ValueError(f"EfficientAD needs images of at least 40 px; got {train.size}")
        targets = self._targets(train, progress)
        c = targets.shape[1]
        self.train_size_ = (h, w)
        # Re-seed: the networks' initial weights depend on the seed alone, not on what drew from the RNG before.
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
                        self._cfg(self.teacher_epochs, self.teacher_lr, self.teacher_batch_size), modules=[teacher],
                        device=dev,
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
            if self.penalty:  # one stand-in "ImageNet" image per step, as the paper's batch of 1
                p = student(penalty_images((h, w), gen, 1).to(dev))[:, :c]
                loss_st = student_loss(t_train[idx], s, p, q)
            else:
                loss_st = hard_feature_loss(t_train[idx], s, q)
            x_aug = colour_augment(x, gen)
            with torch.no_grad():
                t_aug = self._teacher_out(x_aug)
            a = ae(x_aug)
            s_ae = student(x_aug)[:, c:]
            return loss_st + (t_aug - a).pow(2).mean() + (a - s_ae).pow(2).mean()

        progress("train", 0.0, {})
        r2 = train_loop(Objective(list(student.parameters()) + list(ae.parameters()), st_ae_loss, name="loss"),
                        len(train), self._cfg(self.epochs, self.lr, self.batch_size, self.lr_milestones),
                        modules=[student, ae], device=dev,
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
        # back to the stride-4 input grid; replicating the border (the reference code pads zeros, which at 128 px
        # would put 44 % of the pixels at the normal q_a level, above most normal pixels)
        maps = F.pad(m[:, None], (_PAD, _PAD, _PAD, _PAD), mode="replicate")[:, 0]
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
