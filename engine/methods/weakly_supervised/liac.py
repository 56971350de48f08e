"""LIAC (Wan, Gao & Li, "Logit Inducing With Abnormality Capturing for Semi-Supervised Image Anomaly Detection",
IEEE Transactions on Instrumentation and Measurement 2022).

A classifier is trained from many normal images and a few labelled anomalous images. Two parts:
  - the logit inducing loss (LIS) for the imbalance: the logits of normal images are induced to one target
    value (a compact normal class), the logits of the labelled anomalies are induced above a margin on the other
    side; each class is averaged on its own, so 3 anomalies weigh as much as 300 normal images;
  - the abnormality capturing module (ACM): before classification, every position of the feature map gets an
    abnormality value, its distance to the nearest prototype of normal features (k-means of the normal training
    features), standardised on the normal images; the classifier reads the features together with this value,
    and pools its patch logits into the image logit with weights that favour the most abnormal positions.

The paper's full text was not available to us (only its abstract), so LIS and ACM are our reading of their names
and of the abstract; the registry marks the method unfaithful and says so. Searched again for issue 19 (stored web
pages, documentation, code and issue threads: the title, "logit inducing loss", "abnormality capturing module",
the authors, the datasets and numbers): only the abstract (bohrium.dp.tech) and bibliography entries (awesome
lists, a GPT-4V anomaly survey's references) turned up, no full text, restated equations or authors' code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.clustering import kmeans, sq_dists
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


def logit_inducing_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """LIS: normal logits induced to −margin, anomalous logits induced above +margin, classes averaged apart.

    logits (B,), labels (B,) in {0, 1}. L = ½·mean_{y=0} (z + m)² + ½·mean_{y=1} max(0, m − z)².
    A class absent from the batch contributes 0 (its half is dropped, not divided by zero).
    """
    z = logits.float()
    y = labels.to(torch.bool)
    terms = []
    if bool((~y).any()):
        terms.append(((z[~y] + margin) ** 2).mean())
    if bool(y.any()):
        terms.append((torch.relu(margin - z[y]) ** 2).mean())
    return 0.5 * torch.stack(terms).sum() if terms else z.sum() * 0.0


def abnormality(feats: torch.Tensor, prototypes: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """ACM's abnormality map: mean squared distance of each position to its nearest prototype.

    feats (N, C, h, w) standardised features, prototypes (P, C) -> (N, h, w), divided by C.
    """
    n, c, h, w = feats.shape
    out = []
    for i in range(0, n, chunk):
        f = feats[i:i + chunk].permute(0, 2, 3, 1).reshape(-1, c)
        out.append(sq_dists(f, prototypes.to(f.device)).amin(1).view(-1, h, w) / c)
    return torch.cat(out)


class ACMClassifier(nn.Module):
    """Patch classifier reading features + the standardised abnormality map, pooled by abnormality.

    forward: x (N, C, h, w) standardised features, a (N, h, w) standardised abnormality ->
    (image logit (N,), patch logits (N, h, w)). Patch logit = MLP([x, a]); image logit = Σ_p w_p·z_p with
    w = softmax_p(β·a_p), β ≥ 0 learned (softplus), starting near 1.
    """

    def __init__(self, in_channels: int, hidden: int):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(in_channels + 1, hidden, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, 1, 1))
        self.beta = nn.Parameter(torch.tensor(0.5413))  # softplus(0.5413) ≈ 1

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.head(torch.cat([x, a[:, None].to(x.dtype)], 1))[:, 0]          # (N, h, w)
        w = torch.softmax((nn.functional.softplus(self.beta) * a).flatten(1).float(), 1)
        return (w * z.flatten(1).float()).sum(1), z


@register(
    family="weakly_supervised", name="liac", localises=True, supervision="weak",
    paper="Wan, Gao & Li, IEEE TIM 2022",
    summary="Classifier trained with the logit inducing loss (normal logits pulled to one value, the few labelled "
            "anomalies pushed past a margin, classes weighed equally) and an abnormality capturing module "
            "(distance to normal prototypes) that guides where it looks.",
    notes="Only the paper's abstract was available here, so the logit inducing loss (LIS) and the abnormality "
          "capturing module (ACM) are our reading of it, not the paper's equations: LIS = ½·mean over normal "
          "images of (z + m)² + ½·mean over labelled anomalies of max(0, m − z)², m = 1, each class averaged on "
          "its own (the imbalance); ACM = distance of every feature position to the nearest of 16 k-means "
          "prototypes of normal features, standardised on the normal images, fed to the classifier with the "
          "features and used as softmax pooling weights for the patch logits. The classifier is a one-hidden-layer "
          "head on frozen EfficientNet-Lite0 features (blocks.2+blocks.4), not the paper's network. Batches: "
          "normal images with anomalies in their natural proportion (flip/rotation views count), at least one "
          "per batch. Score = image logit; map = patch logits, upsampled and smoothed.",
    faithful=False, trained=True, uses_backbone=True,
    presets={"test": {"epochs": 15, "steps_per_epoch": 10},
             "fast": {"epochs": 20, "steps_per_epoch": 20},
             "quality": {"epochs": 50, "steps_per_epoch": 20}},
)
class LIAC(BaseDetector):
    """Logit-inducing classifier with an abnormality capturing module, on frozen backbone features."""

    requires_anomalies = True

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), hidden: int = 64, margin: float = 1.0,
                 n_prototypes: int = 16, prototype_sample: int = 20000, augment: bool = True, epochs: int = 20,
                 steps_per_epoch: int = 20, batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-2,
                 sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.hidden = hidden
        self.margin = margin
        self.n_prototypes = n_prototypes
        self.prototype_sample = prototype_sample
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

    def _abnormality(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) standardised features -> (N, h, w) abnormality standardised on the normal images."""
        return (abnormality(x, self.prototypes_) - self.a_mean_.to(x.device)) / self.a_std_.to(x.device)

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        assert anomalies is not None
        normal = self._input(train, progress)                              # (Nn, C, h, w)
        anom = self._input(augmented_anomalies(anomalies, self.augment))   # (Na, C, h, w)
        self.mean_, self.std_ = channel_stats(normal)
        g = self.generator_
        zn = standardise(normal, self.mean_, self.std_)
        rows = zn.permute(0, 2, 3, 1).reshape(-1, zn.shape[1])
        pick = torch.randperm(rows.shape[0], generator=g)[: self.prototype_sample]
        self.prototypes_ = kmeans(rows[pick], self.n_prototypes, seed=self.seed)
        a_normal = abnormality(zn, self.prototypes_)
        self.a_mean_, self.a_std_ = a_normal.mean().reshape(1), a_normal.std().clamp_min(1e-6).reshape(1)
        dev = self.device_
        self.net_ = seeded_module(lambda: ACMClassifier(normal.shape[1], self.hidden), self.seed).to(dev)
        n_normal, n_anom = normal.shape[0], anom.shape[0]
        p_anom = n_anom / (n_normal + n_anom)
        normals = NormalCycler(n_normal, g)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            # Natural proportions: each item is an anomaly view with probability p_anom; at least one per batch.
            is_anom = torch.rand(len(idx), generator=g) < p_anom
            is_anom[-1] = True
            a_idx = torch.randint(n_anom, (len(idx),), generator=g)
            x = torch.where(is_anom[:, None, None, None], anom[a_idx], normal[normals.take(len(idx))]).to(dev)
            x = standardise(x, self.mean_, self.std_)
            logits, _ = self.net_(x, self._abnormality(x))
            return logit_inducing_loss(logits, is_anom.to(dev), self.margin)

        cfg = TrainConfig(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay, batch_size=self.batch_size,
                          cuda_batch_size=self.batch_size, val_fraction=0.0, seed=self.seed)
        res = train_loop(Objective(self.net_.parameters(), loss, name="lis"),
                         virtual_pool(self.steps_per_epoch, self.batch_size), cfg, modules=[self.net_],
                         device=dev, progress=progress)
        self.run_notes_ = {"final_lis": round(res.history[-1]["lis"], 4) if res.history else None,
                           "labelled_anomalies": len(anomalies), "anomaly_views": n_anom}

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._input(images)
        scores, patches = [], []
        for i in range(0, feats.shape[0], 32):
            x = standardise(feats[i:i + 32].to(self.device_), self.mean_, self.std_)
            s, z = self.net_(x, self._abnormality(x))
            scores.append(s.float().cpu())
            patches.append(z.float().cpu())
        return Prediction(scores=torch.cat(scores), maps=to_pixel_map(torch.cat(patches), images.size, self.sigma))

    def _state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean_, "std": self.std_, "prototypes": self.prototypes_, "a_mean": self.a_mean_,
                "a_std": self.a_std_, **module_state("net", self.net_)}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.mean_, self.std_ = tensors["mean"], tensors["std"]
        self.prototypes_, self.a_mean_, self.a_std_ = tensors["prototypes"], tensors["a_mean"], tensors["a_std"]
        self.net_ = ACMClassifier(self.mean_.shape[0], self.hidden)
        load_module_state("net", self.net_, tensors)
        self.net_.to(self.device_).eval()
