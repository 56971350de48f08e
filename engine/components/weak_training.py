"""Shared parts of the weakly supervised methods (DevNet, mixed supervision, CAVGA, LIAC, the neural batch sampler).

- `dihedral_views` / `augmented_anomalies`: flip/rotation copies of the few labelled anomalies (DevNet's image
  augmentation), masks moved alike;
- `backbone_input`, `channel_stats`, `standardise`: cached frozen backbone features on one grid and their per-channel
  standardisation on the normal training images;
- `seeded_module`: initial weights that depend on the seed alone (not on whether the feature cache was hit);
- `virtual_pool` / `NormalCycler`: an epoch of a fixed number of balanced batches, filled with every normal
  image in turn.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.api import ImageSet, Progress
from engine.components.anomaly_map import resize_and_concat
from engine.components.features import extract_features


def dihedral_views(images: torch.Tensor, masks: torch.Tensor | None = None,
                   has_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Flip/rotation copies of a few labelled images (the anomaly augmentation of DevNet's image variant).

    images (N, 3, H, W), masks (N, H, W) or None, has_mask (N,) bool or None. Returns the images of every
    view stacked view-major: (V*N, 3, H, W), the masks transformed alike (V*N, H, W) or None, and has_mask
    repeated (V*N,). V = 8 (the dihedral group) for square images, 4 (identity, flips, 180° turn) otherwise.
    """
    square = images.shape[-1] == images.shape[-2]
    ops: list[Any] = [
        lambda t: t,
        lambda t: t.flip(-1),
        lambda t: t.flip(-2),
        lambda t: t.flip(-2, -1),
    ]
    if square:
        ops += [
            lambda t: t.rot90(1, (-2, -1)),
            lambda t: t.rot90(-1, (-2, -1)),
            lambda t: t.transpose(-2, -1),
            lambda t: t.flip(-2, -1).transpose(-2, -1),
        ]
    imgs = torch.cat([op(images).contiguous() for op in ops])
    ms = None if masks is None else torch.cat([op(masks).contiguous() for op in ops])
    hm = has_mask if has_mask is not None else torch.zeros(images.shape[0], dtype=torch.bool)
    return imgs, ms, hm.repeat(len(ops))


def augmented_anomalies(anomalies: ImageSet, augment: bool) -> ImageSet:
    """The labelled anomalies, with their dihedral views when `augment` (labels 1, masks moved alike)."""
    if not augment:
        return anomalies
    imgs, masks, has_mask = dihedral_views(anomalies.images, anomalies.masks, anomalies.has_mask)
    n = imgs.shape[0]
    return ImageSet(images=imgs, labels=torch.ones(n, dtype=torch.int64), masks=masks, has_mask=has_mask,
                    defect_types=list(anomalies.defect_types) * (n // len(anomalies)))


def backbone_input(images: ImageSet, layers: tuple[str, ...], backbone: str, weights: str, device: str,
                   progress: Progress | None = None) -> torch.Tensor:
    """Cached frozen backbone features of `layers`, resized to the first layer's grid: (N, ΣC_l, h, w) on CPU."""
    kw = {"progress": progress} if progress else {}
    feats = extract_features(images, layers, backbone=backbone, weights=weights, device=device, **kw)
    return resize_and_concat(feats)


def channel_stats(feats: torch.Tensor, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) over images and positions of (N, C, h, w) features (float64 sums)."""
    c = feats.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, feats.shape[0], chunk):
        f = feats[i:i + chunk].double()
        s += f.sum((0, 2, 3))
        s2 += (f * f).sum((0, 2, 3))
    n = feats.shape[0] * feats.shape[2] * feats.shape[3]
    mean = s / n
    std = (s2 / n - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-4)


def standardise(feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) features -> zero mean, unit std per channel (statistics of the normal training images)."""
    return (feats - mean.view(1, -1, 1, 1).to(feats.device)) / std.view(1, -1, 1, 1).to(feats.device)


def seeded_module(factory: Any, seed: int) -> nn.Module:
    """Build a module with its initial weights drawn from `seed` alone.

    Feature extraction may or may not build a backbone (cache miss or hit), which draws from the global
    torch RNG; initialising under a forked, re-seeded RNG keeps the weights the same either way.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def virtual_pool(steps_per_epoch: int, batch_size: int) -> int:
    """Items the shared train loop iterates over per epoch: `steps_per_epoch` full batches.

    The weakly supervised methods define an epoch as a fixed number of balanced batches (DevNet: 20
    batches per epoch), independent of how many normal images there are. The pool's items are only slots:
    which normal images fill a batch comes from a `NormalCycler` (every normal image in turn), and as many
    labelled anomalies are drawn per batch.
    """
    return max(2, steps_per_epoch * batch_size)


class NormalCycler:
    """Normal images for the batches of a virtual pool: a seeded random order of all `n` images, taken in turn
    and reshuffled when used up, so every normal image is trained on equally often whatever the pool's size.

    (Indexing normal images by pool slot, `idx % n`, left every image past the pool's size, e.g. 442 of
    Magnetic Tile's 762 normal images at 20 batches of 16, out of training.)
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n = n
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.int64)

    def take(self, b: int) -> torch.Tensor:
        """The next `b` normal image indices (int64, (b,))."""
        while self._order.numel() < b:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.generator)])
        out, self._order = self._order[:b], self._order[b:]
        return out
