"""Do the test set's normal images look like the training images? A check for a shift that every metric would
mix up with the defects.

A detector learns "normal" from the training images; when the test split's normal images were captured or
processed differently (another exposure, another resize or compression), a method that sees global brightness or
sharpness flags them, and its AUROC says more about that shift than about defects (it can fall below 0.5). This
module compares simple per-image statistics of the two normal sets and words a warning when most test normals lie
outside the range of the training images.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.api import ImageSet

# statistic name -> what it is, in words for the warning
_STATS = {"brightness": "mean grey level", "contrast": "grey-level standard deviation",
          "sharpness": "mean absolute difference between neighbouring pixels"}
OUTSIDE_SHARE = 0.5  # a shift when at least this share of test normals lies outside the training range...
RANGE = (2.5, 97.5)  # ...the training images' central 95 %
MIN_IMAGES = 5  # fewer images on either side: no verdict


def image_stats(images: torch.Tensor, chunk: int = 64) -> dict[str, np.ndarray]:
    """Per-image statistics of (N, 3, H, W) uint8 images, each an (N,) float64 array (on grey levels 0..255).

    `chunk` images at a time: a float32 copy of a whole training set is 4× its uint8 images (674 MB for 762 images
    of 288×256 px).
    """
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in _STATS}
    for s in range(0, images.shape[0], chunk):
        grey = images[s:s + chunk].float().mean(1)  # (n, H, W)
        parts["brightness"].append(grey.mean((1, 2)))
        parts["contrast"].append(grey.std((1, 2)))
        parts["sharpness"].append((grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2)))
    return {name: (torch.cat(p) if p else torch.zeros(0)).double().numpy() for name, p in parts.items()}


def normal_shift(train: ImageSet, test: ImageSet) -> str | None:
    """A warning when the test set's normal images differ from the training images, else None.

    For each statistic of `image_stats`, the share of test normals (label 0) outside the training images' central
    95 % range, all on one side; a shift is a share of at least OUTSIDE_SHARE (about 2.5 % is expected by
    chance on either side). Needs MIN_IMAGES images on both sides.
    """
    assert test.labels is not None
    normal = test.labels == 0
    if int(normal.sum()) < MIN_IMAGES or len(train) < MIN_IMAGES:
        return None
    a, b = image_stats(train.images), image_stats(test.images[normal])
    found = []
    for name, what in _STATS.items():
        lo, hi = np.percentile(a[name], RANGE)
        below, above = float(np.mean(b[name] < lo)), float(np.mean(b[name] > hi))
        share, side = (below, "lower") if below >= above else (above, "higher")
        if share >= OUTSIDE_SHARE:
            found.append(f"{what} {side} (test normals median {np.median(b[name]):.1f}, training images "
                         f"{np.median(a[name]):.1f}; {share:.0%} of test normals outside the training images' "
                         f"central 95 %)")
    if not found:
        return None
    return ("The test set's normal images differ from the training images: " + "; ".join(found) + ". Methods "
            "that see this flag normal images as anomalous, so the metrics measure the shift as well as the "
            "defects (an image AUROC below 0.5 is a sign). Check that train/good and test/good were captured and "
            "processed the same way.")
