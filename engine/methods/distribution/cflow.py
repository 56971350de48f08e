"""CFLOW-AD (Gudovskiy et al., "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with Localization via
Conditional Normalizing Flows", WACV 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import upsample
from engine.components.features import extract_features
from engine.components.flows import (
    flows_per_scale,
    gaussian_nll,
    log_likelihood,
    mlp_subnet,
    positional_encoding_2d,
)
from engine.components.train_loop import Objective, TrainConfig, train_loop
from engine.methods.base import BaseDetector, load_module_state, module_state
from engine.registry import register


@register(
    family="distribution", name="cflow", localises=True, trained=True,
    paper="Gudovskiy et al., WACV 2022 (CFLOW-AD)",
    summary="One conditional normalizing flow per feature scale models each feature vector (fiber) given a 2D "
            "positional encoding of where it is; low likelihood = anomalous.",
    notes="EfficientNet-Lite0 blocks.1/2/4 stand in for WideResNet50 layers 1-3. Features are standardised "
          "per channel with training statistics (a fixed affine map; its constant log-det cancels in the map). "
          "Loss = per-dimension NLL (the reference code applies −logsigmoid to it). The map's normalisation "
          "subtracts each scale's maximum log-likelihood over the training fibers instead of over the test set, "
          "so an image's score does not depend on the other test images; map = Σ_scales (1 − p_l) upsampled, "
          "score = its max. Fiber batches are drawn from every position of every training image, one optimiser "
          "step per fiber batch; a fiber's coarser-scale partners are the fibers under the same spot. Log-scales "
          "soft-clamped with 1.9·tanh(s/1.9); last subnet layer zero-initialised. Far fewer epochs than the paper.",
    presets={
        "test": {"epochs": 2, "coupling_blocks": 4, "cond_dim": 64},
        "fast": {"max_steps": 600, "epochs": 1, "coupling_blocks": 4, "cond_dim": 64},
        "quality": {"max_steps": 2400, "epochs": 4, "coupling_blocks": 8, "cond_dim": 128},
    },
)
class CFlow(BaseDetector):
    """Standardised multi-scale fibers + positional condition -> per-scale conditional MLP coupling flow.

    Per scale l: fibers (N·h_l·w_l, C_l) with condition PE(y, x) (cond_dim,) -> per-dimension log p_l
    (N, h_l, w_l). Map (N, H, W) = Σ_l upsample(1 − exp(min(0, log p_l − max_train_l))); score = max of the map.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.1", "blocks.2", "blocks.4"), coupling_blocks: int = 8,
                 cond_dim: int = 128, hidden_ratio: float = 2.0, clamp: float = 1.9, epochs: int = 10,
                 fiber_batch: int = 256, lr: float = 2e-4, weight_decay: float = 1e-5, max_steps: int | None = None,
                 seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.coupling_blocks = coupling_blocks
        self.cond_dim = cond_dim
        self.hidden_ratio = hidden_ratio
        self.clamp = clamp
        self.epochs = epochs
        self.fiber_batch = fiber_batch
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.seed = seed

    # --- parts ---------------------------------------------------------------------------------------
    def _build(self, channels: list[int]) -> nn.ModuleList:
        return flows_per_scale(channels, self.coupling_blocks, [mlp_subnet(self.hidden_ratio)],
                               cond_channels=self.cond_dim, clamp=self.clamp, seed=self.seed, device=self.device_)

    def _features(self, images: ImageSet, progress: Progress | None = None) -> list[torch.Tensor]:
        """Per-layer raw features (N, C_l, h_l, w_l)."""
        kw = {"progress": progress} if progress else {}
        return extract_features(images, self.layers, backbone=self.backbone, weights=self.weights,
                                device=self.device_, **kw)

    def _fibers(self, feats: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Standardised fibers (N·h_l·w_l, C_l) and position codes (h_l·w_l, cond_dim) per scale."""
        fibers, codes = [], []
        for f, mean, std in zip(feats, self.mean_, self.std_, strict=True):
            n, c, h, w = f.shape
            fibers.append(((f - mean[:, None, None]) / std[:, None, None]).permute(0, 2, 3, 1).reshape(-1, c))
            codes.append(positional_encoding_2d(self.cond_dim, h, w).reshape(self.cond_dim, -1).T.contiguous())
        return fibers, codes

    def _log_p(self, flow: nn.Module, fibers: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Per-dimension log p of fibers (M, C) given codes (M, cond_dim) -> (M,), in chunks."""
        out = []
        for s in range(0, fibers.shape[0], 8192):
            z, log_det = flow(fibers[s:s + 8192].to(self.device_), code[s:s + 8192].to(self.device_))
            out.append(log_likelihood(z, log_det, per_dim=True).cpu())
        return torch.cat(out)

    def _scale_log_p(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-scale per-dimension log-likelihood maps, each (N, h_l, w_l)."""
        fibers, codes = self._fibers(feats)
        out = []
        for flow, fib, code, f in zip(self.flows_, fibers, codes, feats, strict=True):
            n, _, h, w = f.shape
            out.append(self._log_p(flow, fib, code.repeat(n, 1)).reshape(n, h, w))
        return out

    # --- contract -----------------------------------------------------------------------------------
    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        feats = self._features(train, progress)
        self.channels_ = [int(f.shape[1]) for f in feats]
        self.mean_ = [f.mean((0, 2, 3)) for f in feats]
        self.std_ = [f.std((0, 2, 3)).clamp_min(1e-6) for f in feats]
        self.flows_ = self._build(self.channels_)
        fibers, codes = self._fibers(feats)
        fibers = [fib.to(self.device_) for fib in fibers]
        codes = [code.to(self.device_) for code in codes]
        n, _, h0, w0 = feats[0].shape

        def rows(idx: torch.Tensor, scale: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Fine-position items (n·h0·w0 numbering) -> rows of this scale's fibers and codes."""
            _, _, h, w = feats[scale].shape
            img, pos = idx // (h0 * w0), idx % (h0 * w0)
            y, x = (pos // w0) * h // h0, (pos % w0) * w // w0
            p = y * w + x
            return img * (h * w) + p, p

        def loss(idx: torch.Tensor) -> torch.Tensor:
            terms = []
            for i, flow in enumerate(self.flows_):
                r, p = rows(idx.to(self.device_), i)
                z, log_det = flow(fibers[i][r], codes[i][p])
                terms.append(gaussian_nll(z, log_det, per_dim=True).mean())
            return torch.stack(terms).mean()

        cfg = TrainConfig(max_steps=self.max_steps, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
                          batch_size=self.fiber_batch,
                          cuda_batch_size=4 * self.fiber_batch, seed=self.seed, patience=3)
        res = train_loop(Objective(list(self.flows_.parameters()), loss), n * h0 * w0, cfg, modules=[self.flows_],
                         device=self.device_, progress=progress)
        self.train_history_ = res.history
        self.run_notes_ = {"training": res.summary()}
        with torch.no_grad():
            self.max_log_p_ = torch.stack([lp.max() for lp in self._scale_log_p(feats)]).double()

    def _predict(self, images: ImageSet) -> Prediction:
        feats = self._features(images)
        total = torch.zeros(len(images), *images.size, dtype=torch.float64)
        for lp, top in zip(self._scale_log_p(feats), self.max_log_p_, strict=True):
            total += upsample(1.0 - (lp.double() - top).clamp(max=0.0).exp(), images.size)
        return Prediction(scores=total.flatten(1).amax(1).float(), maps=total.float())

    def _state(self) -> dict[str, torch.Tensor]:
        state = module_state("flows", self.flows_)
        for i, (m, s) in enumerate(zip(self.mean_, self.std_, strict=True)):
            state[f"mean.{i}"], state[f"std.{i}"] = m, s
        state["max_log_p"] = self.max_log_p_
        return state

    def _extra(self) -> dict[str, Any]:
        return {"channels": self.channels_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.channels_ = [int(c) for c in extra["channels"]]
        self.mean_ = [tensors[f"mean.{i}"] for i in range(len(self.channels_))]
        self.std_ = [tensors[f"std.{i}"] for i in range(len(self.channels_))]
        self.max_log_p_ = tensors["max_log_p"]
        self.flows_ = self._build(self.channels_)
        load_module_state("flows", self.flows_, tensors)
        self.flows_.eval()
