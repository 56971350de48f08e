"""DevNet (Pang, Shen & van den Hengel, "Deep Anomaly Detection with Deviation Networks", KDD 2019).

An anomaly scoring network is trained end to end with the *deviation loss*: scores of normal items are
pulled to the mean of reference scores drawn from a Gaussian prior N(0, 1), and scores of the few
labelled anomalies are pushed at least `margin` standard deviations above it. Batches hold as many
labelled anomalies (sampled with replacement, augmented by flips/rotations) as normal images.

For images we follow the image version of DevNet by the same group (Pang et al., "Explainable deep
few-shot anomaly detection with deviation networks", 2021; the plain-anomaly head of Ding, Pang & Shen,
DRA, CVPR 2022): the scoring head is applied at every position of a frozen pretrained feature map and
the image score is the mean of the top-k patch scores (multiple-instance learning), so the patch
scores double as an anomaly map.

The helpers it shares with the other weakly supervised methods (anomaly augmentation, backbone input features,
per-channel standardisation, the normal-image cycler) live in `engine.components.weak_training`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
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

# --- DevNet ---------------------------------------------------------------------------------------------


def deviation_loss(scores: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                   margin: float = 5.0) -> torch.Tensor:
    """DevNet's deviation loss (Eq. 4–5 of the paper), averaged over the batch.

    scores (B,), labels (B,) in {0, 1}, reference (l,) scores drawn from the prior N(0, 1).
    dev = (score − mean(reference)) / std(reference)   (population std);
    loss = (1 − y)·|dev| + y·max(0, margin − dev).
    """
    mu = reference.mean()
    sigma = reference.std(unbiased=False)
    dev = (scores.float() - mu) / sigma
    y = labels.to(dev.dtype)
    return ((1 - y) * dev.abs() + y * torch.relu(margin - dev)).mean()


def top_k_mean(patch_scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(N, h, w) patch scores -> (N,) mean of the k = max(1, round(ratio·h·w)) largest (top-k MIL)."""
    flat = patch_scores.flatten(1)
    k = max(1, min(flat.shape[1], int(round(ratio * flat.shape[1]))))
    return flat.topk(k, dim=1).values.mean(1)


class PatchScorer(nn.Module):
    """Per-position scoring network: 1×1 conv C→hidden, ReLU, 1×1 conv hidden→1 (DevNet's one hidden layer).

    forward: (N, C, h, w) standardised features -> (N, h, w) patch anomaly scores.
    """

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


@register(
    family="weakly_supervised", name="devnet", localises=True, supervision="weak",
    paper="Pang, Shen & van den Hengel, KDD 2019",
    summary="Scoring network trained with the deviation loss: normal scores pulled to a N(0,1) reference, "
            "the few labelled anomalies pushed ≥ 5σ above it; top-k patch scores give the image score.",
    notes="Image variant of DevNet as in the group's later image works (explainable DevNet 2021, DRA 2022): the "
          "scoring head (one hidden layer) runs on every position of frozen EfficientNet-Lite0 features "
          "(blocks.2+blocks.4, stride 8) instead of a fine-tuned ResNet, and the image score is the top-10% mean "
          "of patch scores (top-k MIL); the map is those patch scores, upsampled and smoothed, learned only from "
          "image labels (weak localisation). Deviation loss, N(0,1) prior with l=5000 reference scores per batch, "
          "margin 5, balanced batches with flip/rotation augmentation of the anomalies as in the paper; AdamW "
          "instead of RMSprop; fixed number of batches per epoch as in the paper, no early stopping.",
    faithful=True, trained=True, uses_backbone=True,
    presets={"test": {"epochs": 20, "steps_per_epoch": 10},
             "fast": {"epochs": 20, "steps_per_epoch": 20},
             "quality": {"epochs": 50, "steps_per_epoch": 20}},
)
class DevNet(BaseDetector):
    """Deviation network on frozen backbone patch features, trained from normal images + labelled anomalies.

    Image score: top-k mean of patch scores (in units of the reference distribution's σ); map: patch scores
    (N, h, w) bilinearly upsampled and Gaussian-smoothed (σ = `sigma` px).
    """

    requires_anomalies = True

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), hidden: int = 64, margin: float = 5.0,
                 n_reference: int = 5000, topk_ratio: float = 0.1, augment: bool = True, epochs: int = 20,
                 steps_per_epoch: int = 20, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-2,
                 sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.hidden = hidden
        self.margin = margin
        self.n_reference = n_reference
        self.topk_ratio = topk_ratio
        self.augment = augment
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.sigma = sigma
        self.seed = seed

    def _input(self, images: ImageSet, progress: Progress | None = None) -> torch.Tensor:
        return backbone_input(images, self.layers, self.backbone, self.weights, self.device_, progress)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        normal = self._input(train, progress)                              # (Nn, C, h, w)
        anom = self._input(augmented_anomalies(anomalies, self.augment))   # (Na, C, h, w)
        self.mean_, self.std_ = channel_stats(normal)
        dev = self.device_
        self.scorer_ = seeded_module(lambda: PatchScorer(normal.shape[1], self.hidden), self.seed).to(dev)
        g = self.generator_
        n_anom = anom.shape[0]
        normals = NormalCycler(normal.shape[0], g)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            # Balanced batch: len(idx) normal images, as many labelled anomalies drawn with replacement.
            a_idx = torch.randint(n_anom, (len(idx),), generator=g)
            x = torch.cat([normal[normals.take(len(idx))], anom[a_idx]]).to(dev)
            y = torch.cat([torch.zeros(len(idx)), torch.ones(len(idx))]).to(dev)
            scores = top_k_mean(self.scorer_(standardise(x, self.mean_, self.std_)), self.topk_ratio)
            ref = torch.randn(self.n_reference, generator=g).to(dev)
            return deviation_loss(scores, y, ref, self.margin)

        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed)
        res = train_loop(Objective(self.scorer_.parameters(), loss, name="deviation_loss"),
                         virtual_pool(self.steps_per_epoch, self.batch_size), cfg, modules=[self.scorer_],
                         device=dev, progress=progress)
        self.run_notes_ = {"final_deviation_loss": round(res.history[-1]["deviation_loss"], 4) if res.history else None,
                           "labelled_anomalies": len(anomalies), "anomaly_views": n_anom}

    def _patch_scores(self, feats: torch.Tensor, chunk: int = 64) -> torch.Tensor:
        """(N, C, h, w) raw features -> (N, h, w) patch scores, in chunks."""
        out = [self.scorer_(standardise(feats[i:i + chunk].to(self.device_), self.mean_, self.std_)).float().cpu()
               for i in range(0, feats.shape[0], chunk)]
        return torch.cat(out)

    def _predict(self, images: ImageSet) -> Prediction:
        patch = self._patch_scores(self._input(images))
        scores = top_k_mean(patch, self.topk_ratio)
        return Prediction(scores=scores, maps=to_pixel_map(patch, images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "std": self.std_, **module_state("scorer", self.scorer_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_, self.std_ = tensors["mean"], tensors["std"]
        self.scorer_ = PatchScorer(self.mean_.shape[0], self.hidden)
        load_module_state("scorer", self.scorer_, tensors)
        self.scorer_.to(self.device_).eval()
