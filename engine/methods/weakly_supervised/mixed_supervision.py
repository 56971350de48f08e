"""Mixed supervision (Božič, Tabernik & Skočaj, "Mixed supervision for surface-defect detection: from weakly to
fully supervised learning", Computers in Industry 2021).

A segmentation sub-network predicts a defect map at 1/8 resolution; a classification sub-network reads the
segmentation features and the segmentation output and decides whether the image is defective. Anomalies
with a pixel mask train both heads; anomalies with only an image label train the classification head alone;
normal images contribute all-zero masks. As in the paper:
  - dynamically balanced loss  L = λ·L_seg + δ·(1 − λ)·L_cls with λ = 1 − epoch / epochs,
  - distance-transform weighting of the segmentation loss on positive pixels, weight (D / D_max)^p,
    on masks dilated by `dilate` px and averaged down to the output grid,
  - gradient-flow adjustment: no gradient flows from the classification head into the segmentation head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.components.weak_training import (
    NormalCycler,
    augmented_anomalies,
    backbone_input,
    channel_stats,
    seeded_module,
    standardise,
    virtual_pool,
)
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.ReLU(inplace=True))


class SegDecNet(nn.Module):
    """Segmentation + classification ("decision") sub-networks on backbone features.

    forward: (N, C, h, w) standardised features -> (cls_logit (N,), seg_logit (N, h, w)).
    The classification sub-network sees the segmentation feature volume and output through `detach()`
    when `stop_gradient` (the paper's gradient-flow adjustment).
    """

    def __init__(self, in_channels: int, seg_channels: int = 64, volume_channels: int = 64,
                 stop_gradient: bool = True):
        super().__init__()
        self.stop_gradient = stop_gradient
        self.seg = nn.Sequential(_conv(in_channels, seg_channels, 1), _conv(seg_channels, seg_channels, 3),
                                 _conv(seg_channels, volume_channels, 3))
        self.seg_out = nn.Conv2d(volume_channels, 1, 1)
        self.dec = nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), _conv(volume_channels + 1, 8, 5),
                                 nn.MaxPool2d(2, ceil_mode=True), _conv(8, 16, 5),
                                 nn.MaxPool2d(2, ceil_mode=True), _conv(16, 32, 5))
        self.fc = nn.Linear(32 * 2 + 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vol = self.seg(x)                       # (N, V, h, w)
        seg = self.seg_out(vol)                 # (N, 1, h, w)
        v_in, s_in = (vol.detach(), seg.detach()) if self.stop_gradient else (vol, seg)
        d = self.dec(torch.cat([v_in, s_in], 1))  # (N, 32, h/8, w/8)
        pooled = torch.cat([d.amax((2, 3)), d.mean((2, 3)), s_in.amax((2, 3)), s_in.mean((2, 3))], 1)  # (N, 66)
        return self.fc(pooled)[:, 0], seg[:, 0]


def seg_targets(masks: torch.Tensor, grid: tuple[int, int], dilate: int, p: float,
                max_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel masks -> (soft targets, loss weights), both (N, h, w) on the output grid.

    masks (N, H, W) {0, 1}. Each mask is dilated by a `dilate`×`dilate` square; positive pixels get the weight
    max_weight·(D / D_max)^p, D their Euclidean distance to the nearest negative pixel (D_max per image), so
    the loss trusts a mask's centre more than its uncertain border; negative pixels weigh 1. Both are then
    averaged down to `grid` with a (2s+1)-wide box at stride s (s = H / h), as in the paper.
    """
    m = masks.float()[:, None]
    if dilate > 1:
        m = F.max_pool2d(m, dilate, stride=1, padding=dilate // 2)[..., : masks.shape[-2], : masks.shape[-1]]
    m_np = m[:, 0].numpy() > 0.5
    w = np.ones(m_np.shape, dtype=np.float32)
    for i in range(m_np.shape[0]):
        if m_np[i].any():
            d = distance_transform_edt(m_np[i])
            w[i][m_np[i]] = (max_weight * (d / d.max()) ** p)[m_np[i]]
    return _downsize(m, grid), _downsize(torch.from_numpy(w)[:, None], grid)


def _downsize(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) -> (N, h, w): reflect-pad s, box of 2s+1 at stride s, then exact resize to `grid`."""
    s = max(1, int(round(x.shape[-2] / grid[0])))
    if s > 1 and min(x.shape[-2:]) > s:
        x = F.avg_pool2d(F.pad(x, (s, s, s, s), mode="reflect"), 2 * s + 1, stride=s)
    if tuple(x.shape[-2:]) != tuple(grid):
        x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
    return x[:, 0]


@register(
    family="weakly_supervised", name="mixed_supervision", localises=True, supervision="weak",
    paper="Božič, Tabernik & Skočaj, Computers in Industry 2021",
    summary="Segmentation sub-network + classification sub-network on top of it, trained with pixel masks "
            "where available and image labels for the rest; map = segmentation, score = classification.",
    notes="The paper trains its sub-networks from the image; here both read frozen EfficientNet-Lite0 features "
          "(blocks.2+blocks.4, stride 8 like the paper's output) to keep CPU training short, and the "
          "segmentation sub-network is smaller (1×1 then two 3×3 convs, 64 channels, instead of 11 convs up to "
          "1024 channels and a 15×15 kernel: the backbone features already have a large receptive field). "
          "Kept from the paper: λ schedule (λ = 1 − epoch/epochs, δ = 0.01), distance-transform weighting "
          "(p = 2) of positive pixels on dilated masks, stop-gradient from classification into segmentation, "
          "classification on segmentation volume + output with global max/avg pooling, masks only for "
          "`n_masks` anomalies (default all). Differences: AdamW instead of SGD, balanced batches (as many "
          "labelled anomalies, with flip/rotation views, as normal images) instead of frequency sampling, "
          "a fixed number of batches per epoch. Without any mask the map is learnt from normal images only.",
    faithful=True, trained=True, uses_backbone=True,
    presets={"test": {"epochs": 8, "steps_per_epoch": 8, "lr": 0.003},
             "fast": {"epochs": 20, "steps_per_epoch": 15},
             "quality": {"epochs": 50, "steps_per_epoch": 20}},
)
class MixedSupervision(BaseDetector):
    """Segmentation/classification network trained from normal images, some anomaly masks and image labels.

    Image score: classification logit; map: sigmoid of the segmentation logits (N, h, w), upsampled by the base.
    """

    requires_anomalies = True

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), seg_channels: int = 64,
                 volume_channels: int = 64, n_masks: int | None = None, dilate: int = 7, dist_p: float = 2.0,
                 delta: float = 0.01, dynamic_balance: bool = True, stop_gradient: bool = True,
                 augment: bool = True, epochs: int = 20, steps_per_epoch: int = 15, batch_size: int = 8,
                 lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.seg_channels = seg_channels
        self.volume_channels = volume_channels
        self.n_masks = n_masks
        self.dilate = dilate
        self.dist_p = dist_p
        self.delta = delta
        self.dynamic_balance = dynamic_balance
        self.stop_gradient = stop_gradient
        self.augment = augment
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.seed = seed

    def _input(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        return backbone_input(images, self.layers, self.backbone, self.weights, self.device_, progress)

    def _mask_rows(self, anomalies: ImageSet) -> torch.Tensor:
        """(Na,) bool: which labelled anomalies keep their pixel mask (n_masks of those that have one, seeded)."""
        assert anomalies.has_mask is not None
        has = anomalies.has_mask.clone()
        if anomalies.masks is None:
            has[:] = False
        if self.n_masks is not None:
            rows = has.nonzero()[:, 0]
            keep = rows[torch.randperm(len(rows), generator=self.generator_)[: max(0, int(self.n_masks))]]
            has = torch.zeros_like(has)
            has[keep] = True
        return has

    def loss_weights(self, epoch: int) -> tuple[float, float]:
        """(segmentation weight λ, classification weight δ·(1 − λ)) for a 0-based epoch (dynamic balancing)."""
        if not self.dynamic_balance:
            return 1.0, self.delta
        lam = 1.0 - epoch / max(1, self.epochs)
        return lam, self.delta * (1.0 - lam)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        segmented = self._mask_rows(anomalies)
        lab = ImageSet(images=anomalies.images, labels=anomalies.labels, masks=anomalies.masks,
                       has_mask=segmented, defect_types=anomalies.defect_types, paths=anomalies.paths,
                       digest=anomalies.digest)
        views = augmented_anomalies(lab, self.augment)
        normal = self._input(train, progress)      # (Nn, C, h, w)
        anom = self._input(views)                  # (Na, C, h, w)
        grid = (normal.shape[-2], normal.shape[-1])
        assert views.has_mask is not None
        anom_seg = views.has_mask.clone()          # (Na,) bool: segmentation loss applies
        if views.masks is not None and bool(anom_seg.any()):
            tgt, wts = seg_targets(views.masks, grid, self.dilate, self.dist_p)
        else:
            tgt = wts = torch.zeros(anom.shape[0], *grid)
        self.mean_, self.std_ = channel_stats(normal)
        dev = self.device_
        self.net_ = seeded_module(lambda: SegDecNet(normal.shape[1], self.seg_channels, self.volume_channels,
                                                    self.stop_gradient), self.seed).to(dev)
        g = self.generator_
        n_anom = anom.shape[0]
        normals = NormalCycler(normal.shape[0], g)
        epoch = [0]

        def loss(idx: torch.Tensor) -> torch.Tensor:
            b = len(idx)
            a_idx = torch.randint(n_anom, (b,), generator=g)
            x = standardise(torch.cat([normal[normals.take(b)], anom[a_idx]]).to(dev), self.mean_, self.std_)
            y = torch.cat([torch.zeros(b), torch.ones(b)]).to(dev)
            target = torch.cat([torch.zeros(b, *grid), tgt[a_idx]]).to(dev)
            weight = torch.cat([torch.ones(b, *grid), wts[a_idx]]).to(dev)
            use_seg = torch.cat([torch.ones(b, dtype=torch.bool), anom_seg[a_idx]]).to(dev)
            cls, seg = self.net_(x)
            lam, w_cls = self.loss_weights(epoch[0])
            pix = F.binary_cross_entropy_with_logits(seg.float(), target, reduction="none") * weight
            l_seg = pix[use_seg].mean()
            l_cls = F.binary_cross_entropy_with_logits(cls.float(), y)
            return lam * l_seg + w_cls * l_cls

        def track(stage: str, fraction: float | None = None, info: dict[str, Any] | None = None) -> None:
            if stage == "train" and info and "epoch" in info:
                epoch[0] = int(info["epoch"])  # epochs completed = 0-based index of the next one
            progress(stage, fraction, info or {})

        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed)
        res = train_loop(Objective(self.net_.parameters(), loss, name="loss"),
                         virtual_pool(self.steps_per_epoch, self.batch_size), cfg, modules=[self.net_], device=dev,
                         progress=track)
        self.run_notes_ = {"final_loss": round(res.history[-1]["loss"], 5) if res.history else None,
                           "labelled_anomalies": len(anomalies), "with_masks": int(segmented.sum()),
                           "anomaly_views": n_anom}

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._input(images)
        scores, maps = [], []
        for i in range(0, feats.shape[0], 32):
            cls, seg = self.net_(standardise(feats[i:i + 32].to(self.device_), self.mean_, self.std_))
            scores.append(cls.float().cpu())
            maps.append(torch.sigmoid(seg.float()).cpu())
        return Prediction(scores=torch.cat(scores), maps=torch.cat(maps))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "std": self.std_, **module_state("net", self.net_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_, self.std_ = tensors["mean"], tensors["std"]
        self.net_ = SegDecNet(self.mean_.shape[0], self.seg_channels, self.volume_channels, self.stop_gradient)
        load_module_state("net", self.net_, tensors)
        self.net_.to(self.device_).eval()
