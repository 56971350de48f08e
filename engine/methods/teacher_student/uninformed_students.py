"""Uninformed Students (Bergmann, Fauser, Sattlegger & Steger, "Uninformed Students: Student-Teacher Anomaly
Detection with Discriminative Latent Embeddings", CVPR 2020).

An ensemble of M students, each randomly initialised and trained to regress the frozen teacher's
descriptors (normalised per channel with the training mean and std) on normal images, at several receptive
fields. At test time two signals flag a position: the regression error of the ensemble's mean prediction and
the predictive variance across students (students agree only where they were trained). Each is standardised
with its mean and std over the normal images; their sum is the score at one receptive field, and the scores of
all receptive fields are averaged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ConfigError, ImageSet, Prediction, Progress, no_progress, to_float_images
from engine.components.anomaly_map import gaussian_blur, upsample
from engine.components.features import extract_features
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.device import autocast, batch_size
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.methods.teacher_student.stfpm import TrainableStudent
from engine.registry import register


def ensemble_error_variance(preds: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's two per-position signals (Eqs. 8 and 9).

    preds (M, N, C, h, w) the students' predictions; target (N, C, h, w) the normalised teacher descriptor.
    error e = ‖mean_m preds − target‖², variance v = mean_m ‖preds_m‖² − ‖mean_m preds‖²; each (N, h, w).
    """
    mean = preds.mean(0)
    e = ((mean - target) ** 2).sum(1)
    v = (preds * preds).sum(2).mean(0) - (mean * mean).sum(1)
    return e, v.clamp_min(0)


def standardise(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std with stats = tensor([mean, std])."""
    return (x - stats[0]) / stats[1]


@register(
    family="teacher_student", name="uninformed_students", localises=True, trained=True,
    paper="Bergmann et al., CVPR 2020 (Uninformed Students)",
    summary="An ensemble of students regresses a pretrained teacher's descriptors at several receptive fields; "
            "score = regression error + disagreement (predictive variance) between students.",
    notes="The pretrained EfficientNet-Lite0 itself is the teacher (stages blocks.1/2/4, strides 4/8/16, as "
          "three receptive fields) instead of a descriptor network distilled from ResNet-18 at p = 17/33/65 with "
          "the paper's metric-learning losses; the students are randomly initialised copies of the teacher's "
          "architecture (as the paper), each giving all three stages from one network rather than one network "
          "per receptive field. M = 3 students by default (test preset: 2). Teacher descriptors normalised per "
          "channel; students trained with the paper's MSE regression loss through the shared loop (AdamW); error "
          "and variance standardised with their mean and std over the training images (the paper uses a "
          "held-out validation set), summed, averaged over receptive fields, smoothed with σ=4 (the paper: "
          "none; sigma=0 turns it off); image score = map maximum. Far fewer steps than the paper on CPU (reduced).",
    presets={
        "test": {"n_students": 2, "epochs": 8, "lr": 5e-3},
        "fast": {"n_students": 3, "epochs": 10, "max_steps": 60, "lr": 5e-3},
        "quality": {"n_students": 3, "epochs": 60, "max_steps": 300, "lr": 2e-3},
    },
)
class UninformedStudents(BaseDetector):
    """Teacher descriptors t_l (N, C_l, h_l, w_l) per stage l; students s_{m,l}; per stage the standardised
    error + variance (N, h_l, w_l), upsampled and averaged over stages -> map (N, H, W); score = max."""

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), n_students: int = 3,
                 epochs: int = 10, lr: float = 5e-3, batch_size: int = 8, max_steps: int | None = None,
                 sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.n_students = n_students
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.sigma = sigma
        self.seed = seed

    def _teacher(self, images: ImageSet, progress: Progress = no_progress) -> list[torch.Tensor]:
        """Normalised teacher descriptors per stage, (N, C_l, h_l, w_l)."""
        feats = extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                 device=self.device_, progress=progress)
        return [(f - m) / s for f, m, s in zip(feats, self.t_mean_, self.t_std_, strict=True)]

    def _build(self) -> nn.ModuleList:
        return nn.ModuleList(TrainableStudent.build(self.backbone, self.layers, self.seed * 1000 + m)
                             for m in range(self.n_students)).to(self.device_)

    def _predictions(self, images: ImageSet) -> list[torch.Tensor]:
        """Per stage the students' predictions (M, N, C_l, h_l, w_l), float32 on CPU."""
        self.students_.eval()
        outs: list[list[list[torch.Tensor]]] = [[[] for _ in self.layers] for _ in self.students_]
        bs = batch_size(self.device_)
        with torch.no_grad(), autocast(self.device_):
            for s in range(0, len(images), bs):
                x = to_float_images(images.images[s:s + bs]).to(self.device_)
                for m, student in enumerate(self.students_):
                    for i, f in enumerate(student(x)):
                        outs[m][i].append(f.float().cpu())
        return [torch.stack([torch.cat(outs[m][i]) for m in range(len(self.students_))])
                for i in range(len(self.layers))]

    def _signals(self, images: ImageSet) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per stage (error, variance), each (N, h_l, w_l)."""
        return [ensemble_error_variance(p, t) for p, t in
                zip(self._predictions(images), self._teacher(images), strict=True)]

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        if self.n_students < 2:
            raise ConfigError("uninformed_students.n_students must be ≥ 2: the predictive variance needs an ensemble")
        raw = extract_features(train, self.layers, backbone=self.backbone, weights=self.weights,
                               device=self.device_, progress=progress)
        self.t_mean_ = [f.mean((0, 2, 3))[:, None, None] for f in raw]
        self.t_std_ = [f.std((0, 2, 3))[:, None, None].clamp_min(1e-6) for f in raw]
        targets = [t.to(self.device_) for t in self._teacher(train)]
        self.students_ = self._build()
        images = train.images

        def loss(idx: torch.Tensor) -> torch.Tensor:
            x = to_float_images(images[idx]).to(self.device_)
            i = idx.to(self.device_)
            total = x.new_zeros(())
            for student in self.students_:
                for t, s in zip(targets, student(x), strict=True):
                    total = total + ((s.float() - t[i]) ** 2).sum(1).mean()
            return total / len(self.students_)

        cfg = TrainConfig(epochs=self.epochs, max_steps=self.max_steps, lr=self.lr, batch_size=self.batch_size,
                          seed=self.seed)
        res = train_loop(Objective(list(self.students_.parameters()), loss), len(train), cfg,
                         modules=[self.students_], device=self.device_, progress=progress)
        self.run_notes_ = {"training": res.summary()}
        progress("calibration", 0.0, {})
        stats = []
        for e, v in self._signals(train):
            stats.append(torch.tensor([[e.mean(), e.std().clamp_min(1e-8)], [v.mean(), v.std().clamp_min(1e-8)]]))
        self.stats_ = torch.stack(stats)  # (L, 2 [error, variance], 2 [mean, std])

    def _predict(self, images: ImageSet) -> Prediction:
        amap = torch.zeros(len(images), *images.size)
        for (e, v), st in zip(self._signals(images), self.stats_, strict=True):
            amap += upsample(standardise(e, st[0]) + standardise(v, st[1]), images.size)
        amap = gaussian_blur(amap / len(self.layers), self.sigma)
        return Prediction(scores=amap.flatten(1).amax(1), maps=amap)

    def _state(self) -> dict[str, torch.Tensor]:
        out = {**module_state("students", self.students_), "stats": self.stats_}
        for i, (m, s) in enumerate(zip(self.t_mean_, self.t_std_, strict=True)):
            out[f"t_mean.{i}"], out[f"t_std.{i}"] = m, s
        return out

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        n = len(self.layers)
        self.t_mean_ = [tensors[f"t_mean.{i}"] for i in range(n)]
        self.t_std_ = [tensors[f"t_std.{i}"] for i in range(n)]
        self.stats_ = tensors["stats"]
        self.students_ = self._build()
        load_module_state("students", self.students_, {k: v for k, v in tensors.items() if k.startswith("students.")})
        self.students_.eval()
