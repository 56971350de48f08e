"""Image compositing for the dashboard: mask overlays, colour-mapped anomaly maps, blending.

Every function takes and returns numpy arrays: images are (H, W, 3) uint8 RGB, masks (H, W) in {0, 1},
anomaly maps (H, W) float. The colour map and the heat overlay live in `engine.heatmap` (the engine draws the
same overlay for `adlab predict`); they are re-exported here so the pages have one place to import from.
"""

from __future__ import annotations

import numpy as np

from engine.heatmap import blend, colorize, heat_overlay, map_range, resize, to_rgb_uint8

__all__ = ["blend", "colorize", "colour_bar", "colour_ranges", "heat_overlay", "map_range", "mask_outline",
           "overlay_mask", "resize", "to_rgb_uint8"]


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of the mask that touch a non-mask pixel (4-neighbourhood)."""
    m = np.asarray(mask) > 0
    p = np.pad(m, 1, mode="constant", constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray | None, color: tuple[int, int, int] = (0, 230, 90),
                 alpha: float = 0.35) -> np.ndarray:
    """The image with the mask tinted in `color` (fill at `alpha`, opaque outline). None or empty mask: unchanged."""
    img = to_rgb_uint8(image)
    if mask is None:
        return img
    m = resize((np.asarray(mask) > 0).astype(np.uint8) * 255, img.shape[:2], nearest=True) > 0
    if not m.any():
        return img
    out = img.astype(np.float64)
    c = np.asarray(color, dtype=np.float64)
    out[m] = (1 - alpha) * out[m] + alpha * c
    out[mask_outline(m)] = c
    return out.round().astype(np.uint8)


def colour_ranges(maps: dict[str, np.ndarray], mode: str) -> dict[str, tuple[float, float]]:
    """Colour range per method. mode "per_method": each method's own range over all its test maps;
    "shared": one range over every method's maps (useful when methods score on the same scale)."""
    if mode not in ("per_method", "shared"):
        raise ValueError("mode must be 'per_method' or 'shared'")
    own = {k: map_range(v) for k, v in maps.items()}
    if mode == "per_method" or not own:
        return own
    lo = min(r[0] for r in own.values())
    hi = max(r[1] for r in own.values())
    return {k: (lo, hi) for k in own}


def colour_bar(width: int = 256, height: int = 14) -> np.ndarray:
    """(height, width, 3) uint8 strip of the colour scale, low on the left."""
    row = colorize(np.linspace(0.0, 1.0, width)[None, :], 0.0, 1.0)
    return np.repeat(row, height, axis=0)
