"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022)."""

from __future__ import annotations

from typing import Any

import torch

from engine.api import ImageSet, Prediction, Progress
from engine.components.anomaly_map import to_pixel_map
from engine.components.coreset import coreset_projection, coreset_projection_chunks, greedy_k_center
from engine.components.features import extract_features, patch_feature_chunks, patch_rows
from engine.components.knn import NearestNeighbours
from engine.heap import trim
from engine.methods.base import BaseDetector
from engine.registry import register


@register(
    family="memory_bank", name="patchcore", localises=True, paper="Roth et al., CVPR 2022",
    summary="Memory bank of locally aware mid-level patch features, thinned by a greedy coreset; "
            "score = distance to the nearest normal patch.",
    notes="Layers blocks.2+blocks.4 of EfficientNet-Lite0 (strides 8/16) stand in for WideResNet layer2+layer3. "
          "Locally aware features: 3x3 average with zero padding counted (pad='zero'), as the paper's code; "
          "pad='valid' averages border windows over real cells only. "
          "Coreset 1% by default (the paper reports 1%, 10% and 25%; 'quality' uses 10%), always the paper's exact "
          "greedy selection over every training patch (engine.components.coreset). max_candidates=N is an opt-in "
          "shortcut for very large sets: the selection then runs over a seeded random subset of N patches, still "
          "keeping coreset_ratio of all patches.",
    presets={"fast": {"coreset_ratio": 0.01}, "quality": {"coreset_ratio": 0.1}},
)
class PatchCore(BaseDetector):
    """Locally aware patch features -> greedy coreset memory bank -> nearest-neighbour patch distance.

    Image score: the largest patch distance, re-weighted as in the paper (Eq. 7) by how isolated its
    nearest bank entry is among its `num_neighbors` neighbours. Map: patch distances upsampled and
    Gaussian-smoothed (σ = 4 px).
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str = "auto",
                 layers: tuple[str, ...] = ("blocks.2", "blocks.4"), patch_size: int = 3, pad: str = "zero",
                 coreset_ratio: float = 0.01, proj_dim: int = 128, max_candidates: int | None = None,
                 num_neighbors: int = 9, sigma: float = 4.0, seed: int = 0):
        self.backbone = backbone
        self.weights = weights
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.pad = pad
        self.coreset_ratio = coreset_ratio
        self.proj_dim = proj_dim
        self.max_candidates = max_candidates
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.seed = seed

    def _feature_args(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "weights": self.weights, "device": self.device_,
                "patch_size": self.patch_size, "pad": self.pad}

    def _fit(self, train: ImageSet, anomalies: ImageSet | None, progress: Progress) -> None:
        h, w = extract_features(train, self.layers, backbone=self.backbone, weights=self.weights,
                                device=self.device_, progress=progress)[0].shape[-2:]
        n_patches = len(train) * h * w  # the patch grid is the first layer's
        n = max(1, int(round(self.coreset_ratio * n_patches)))
        report = {"patches": n_patches, "keep": n}
        if n < n_patches and (self.max_candidates is None or n_patches <= self.max_candidates):
            # The greedy selection over every patch needs only their projection: it is made a chunk of images at
            # a time, so the (N·h·w, D) patches are never held (534 MB on 762 images of 288×256 px); the chosen
            # rows are made again afterwards. The same projection, hence the same bank, as from the stacked rows.
            chunks = (emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
                      for emb in patch_feature_chunks(train, self.layers, **self._feature_args()))
            z, first = coreset_projection_chunks(chunks, n_patches, proj_dim=self.proj_dim, seed=self.seed)
            trim()  # the chunks' freed work space (135 MB kept by glibc on mt) goes back before the selection
            progress("coreset", 0.0, {**report, "candidates": n_patches})
            idx = greedy_k_center(z, n, first, progress=lambda f: progress("coreset", f, report))
            del z
            self.memory_bank_ = self._rows(train, idx)
        else:
            self.memory_bank_ = self._bank_from_rows(train, n, report, progress)
        self._knn = NearestNeighbours(self.memory_bank_, self.device_)
        progress("coreset", 1.0, {"bank": int(self.memory_bank_.shape[0])})

    def _bank_from_rows(self, train: ImageSet, n: int, report: dict[str, int], progress: Progress) -> torch.Tensor:
        """(n, D) bank when every patch is kept (n = all of them) or the selection runs on a random subset of
        max_candidates patches: both start from the (N·h·w, D) patch rows."""
        # (N·h·w, D) locally aware patch embeddings, built without the (N, D, h, w) map beside them
        patches, _ = patch_rows(train, self.layers, progress=progress, **self._feature_args())
        n_patches = patches.shape[0]
        rows = None  # the pool's rows of `patches`; None: all of them
        if self.max_candidates is not None and n_patches > self.max_candidates:
            # The exact greedy selection still costs about (candidates × centres) distance pairs, only fewer
            # and in blocks (~8 CPU-minutes for 10% of 780k patches); a random subset keeps the fast preset
            # bounded (the bank still gets coreset_ratio of all patches).
            g = torch.Generator().manual_seed(self.seed)
            rows = torch.randperm(n_patches, generator=g)[: self.max_candidates]
        pool = patches if rows is None else patches[rows]
        del patches
        progress("coreset", 0.0, {**report, "candidates": pool.shape[0]})
        if n >= pool.shape[0]:
            return pool.contiguous()
        # The selection runs on the projection only: the pool is freed meanwhile and the chosen rows made again.
        z, first = coreset_projection(pool, proj_dim=self.proj_dim, seed=self.seed)
        del pool
        idx = greedy_k_center(z, n, first, progress=lambda f: progress("coreset", f, report))
        del z
        return self._rows(train, idx if rows is None else rows[idx])

    def _rows(self, images: ImageSet, idx: torch.Tensor) -> torch.Tensor:
        """(len(idx), D): rows idx of patch_rows(images), in the order of idx, made a chunk of images at a time."""
        out: torch.Tensor | None = None
        start = 0
        for emb in patch_feature_chunks(images, self.layers, **self._feature_args()):
            b, d, h, w = emb.shape
            if out is None:
                out = torch.empty(idx.shape[0], d, dtype=emb.dtype)
            here = ((idx >= start) & (idx < start + b * h * w)).nonzero().squeeze(1)
            out[here] = emb.permute(0, 2, 3, 1).reshape(-1, d)[idx[here] - start]
            start += b * h * w
        assert out is not None
        return out

    def _predict(self, images: ImageSet) -> Prediction:
        # A chunk of images at a time: their embeddings, nearest-bank distances and Eq. 7 weights; only the
        # patch distances (N, h, w) of the whole set are kept.
        patches, scores = [], []
        for emb in patch_feature_chunks(images, self.layers, **self._feature_args()):
            n, d, h, w = emb.shape
            q = emb.permute(0, 2, 3, 1).reshape(n, h * w, d)
            dist, idx = self._knn.search(q.reshape(-1, d), 1)
            patch = dist[:, 0].reshape(n, h * w)
            nn_idx = idx[:, 0].reshape(n, h * w)
            best = patch.argmax(1)
            rows = torch.arange(n)
            scores.append(patch[rows, best] * self._reweight(q[rows, best], nn_idx[rows, best]))
            patches.append(patch.reshape(n, h, w))
        maps = to_pixel_map(torch.cat(patches), images.size, self.sigma)
        return Prediction(scores=torch.cat(scores), maps=maps)

    def _reweight(self, m_test: torch.Tensor, m_star_idx: torch.Tensor) -> torch.Tensor:
        """Paper's Eq. 7 weight: 1 − softmax over the distances from m_test to m* and m*'s bank neighbours.

        m_test (n, D) the most anomalous patch of each image; m_star_idx (n,) its nearest bank entry.
        """
        b = min(self.num_neighbors, self.memory_bank_.shape[0])
        if b <= 1:
            return torch.ones(m_test.shape[0])
        _, nb = self._knn.search(self.memory_bank_[m_star_idx], b)  # N_b(m*), m* itself first
        d = torch.linalg.vector_norm(self.memory_bank_[nb] - m_test[:, None], dim=-1)  # (n, b)
        return 1.0 - torch.softmax(d.double(), dim=1)[:, 0].float()

    def _state(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self.memory_bank_}

    def _set_state(self, tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
        self.memory_bank_ = tensors["memory_bank"]
        self._knn = NearestNeighbours(self.memory_bank_, self.device_)
