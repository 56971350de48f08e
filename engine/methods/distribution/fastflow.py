"""FastFlow (Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
arXiv 2111.07677, 2021)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import upsample
from engine.components.features import extract_features
from engine.components.flows import SubnetFactory, conv_subnet, flows_per_scale, gaussian_nll, log_likelihood
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register

_MAX_LOG_P = 50.0  # exp() guard for the likelihood map


@register(
    family="distribution", name="fastflow", localises=True, trained=True,
    paper="Yu et al., arXiv 2021 (FastFlow)",
    summary="A 2D normalizing flow per feature scale (conv subnets, 3×3 and 1×1 alternating) maps frozen "
            "backbone features to a standard normal; low likelihood = anomalous.",
    notes="EfficientNet-Lite0 blocks.1/2/4 (strides 4/8/16) stand in for ResNet18 stages 1-3. LayerNorm over "
          "(C, h, w) per image has no learned affine (a learned one lets training shrink the inputs and game "
          "the likelihood). Log-scales soft-clamped with 2·tanh(s/2) instead of FrEIA's atan; subnets' last "
          "layer zero-initialised (identity start). Loss = per-dimension NLL (the paper's NLL / C). Map: "
          "−mean over scales of upsampled exp(per-dimension log p), log p including the log-det, as in the "
          "paper; score = max of the map. Far fewer epochs than the paper's 500.",
    presets={
        "test": {"epochs": 6, "flow_steps": 4},
        "fast": {"max_steps": 100, "epochs": 16, "flow_steps": 4},
        "quality": {"max_steps": 400, "epochs": 40, "flow_steps": 8},
    },
)
class FastFlow(BaseDetector):
    """LayerNorm'd multi-scale features -> per-scale 2D coupling flow -> per-position likelihood map.

    Per scale l: features f_l (N, C_l, h_l, w_l) -> z_l, log_det_l (N, h_l, w_l) -> log p_l per dimension.
    Map (N, H, W) = −(1/L) Σ_l upsample(exp(log p_l)); score (N,) = max of the map.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), flow_steps: int = 8,
                 hidden_ratio: float = 1.0, conv3x3_only: bool = False, clamp: float = 2.0, epochs: int = 20,
                 batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-5, max_steps: int | None = None,
                 seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.flow_steps = flow_steps
        self.hidden_ratio = hidden_ratio
        self.conv3x3_only = conv3x3_only
        self.clamp = clamp
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.seed = seed

    # --- parts ---------------------------------------------------------------------------------------
    def _build(self, channels: list[int]) -> nn.ModuleList:
        subnets: list[SubnetFactory] = [conv_subnet(3, self.hidden_ratio)]
        if not self.conv3x3_only:
            subnets.append(conv_subnet(1, self.hidden_ratio))
        return flows_per_scale(channels, self.flow_steps, subnets, clamp=self.clamp, seed=self.seed,
                               device=self.device_)

    def _features(self, images: ImageSet, progress: Progress | None = None) -> list[torch.Tensor]:
        """Per-layer (N, C_l, h_l, w_l) features, LayerNorm'd over (C, h, w) of each image (no affine)."""
        kw = {"progress": progress} if progress else {}
        feats = extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                 device=self.device_, **kw)
        return [F.layer_norm(f, f.shape[1:]) for f in feats]

    def _log_p(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale per-dimension log-likelihoods, each (N, h_l, w_l)."""
        out = []
        for flow, f in zip(self.flows_, feats, strict=True):
            z, log_det = flow(f.to(self.device_))
            out.append(log_likelihood(z, log_det, per_dim=True))
        return out

    # --- contract -----------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        feats = self._features(train, progress)
        self.channels_ = [int(f.shape[1]) for f in feats]
        self.flows_ = self._build(self.channels_)

        def loss(idx: torch.Tensor) -> torch.Tensor:
            terms = []
            for flow, f in zip(self.flows_, feats, strict=True):
                z, log_det = flow(f[idx].to(self.device_))
                terms.append(gaussian_nll(z, log_det, per_dim=True).mean())
            return torch.stack(terms).mean()

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.batch_size, seed=self.seed)
        res = train_loop(Objective(list(self.flows_.parameters()), loss), len(train), cfg, modules=[self.flows_],
                         device=self.device_, progress=progress)
        self.train_history_ = res.history
        self.run_notes_ = {"training": res.summary()}

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._features(images)
        maps = []
        for s in range(0, len(images), 16):
            log_ps = self._log_p([f[s:s + 16] for f in feats])
            probs = [upsample(lp.double().clamp(max=_MAX_LOG_P).exp().cpu(), images.size) for lp in log_ps]
            maps.append(-torch.stack(probs).mean(0))
        amap = torch.cat(maps)
        return Prediction(scores=amap.flatten(1).amax(1).float(), maps=amap.float())

    def _state(self) -> dict[str, torch.Tensor]:
        return module_state("flows", self.flows_)

    def _extra(self) -> dict[str, Any]:
        return {"channels": self.channels_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.channels_ = [int(c) for c in extra["channels"]]
        self.flows_ = self._build(self.channels_)
        load_module_state("flows", self.flows_, tensors)
        self.flows_.eval()
