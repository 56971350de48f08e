"""Drawing anomaly maps over images, shared by the engine (`adlab predict` heatmap PNGs) and the dashboard.

Pure numpy + PIL (no streamlit). Images are (H, W, 3) uint8 RGB, anomaly maps (H, W) float.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Opacity of the map over the image: the Heatmaps page's default, and what `adlab predict` draws.
DEFAULT_OPACITY = 0.55

# Anchor colours of a perceptually ordered "inferno"-like scale (black -> purple -> orange -> pale yellow).
_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
    [252, 255, 164],
], dtype=np.float64)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Any (H, W), (H, W, 1|3|4) or (3, H, W) array (uint8 or float in [0, 1]) as (H, W, 3) uint8."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float64)) * (255.0 if a.max(initial=0) <= 1.0 else 1.0), 0, 255)
        a = a.round().astype(np.uint8)
    return np.ascontiguousarray(a)


def resize(image: np.ndarray, size: tuple[int, int], *, nearest: bool = False) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) uint8/float array to size = (H, W)."""
    a = np.asarray(image)
    if a.shape[:2] == tuple(size):
        return a
    mode = Image.NEAREST if nearest else Image.BILINEAR
    if a.dtype == np.uint8:
        return np.asarray(Image.fromarray(a).resize((size[1], size[0]), mode))
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize((size[1], size[0]), mode))


def colorize(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 on an inferno-like scale, `vmin` black and `vmax` pale yellow."""
    a = np.nan_to_num(np.asarray(amap, dtype=np.float64))
    span = vmax - vmin
    t = np.zeros_like(a) if not np.isfinite(span) or span <= 0 else np.clip((a - vmin) / span, 0.0, 1.0)
    pos = t * (len(_ANCHORS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (pos - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    return rgb.round().clip(0, 255).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, opacity: float) -> np.ndarray:
    """`overlay` over `image` at `opacity` in [0, 1] (0 shows the image only, 1 the overlay only)."""
    img = to_rgb_uint8(image)
    ov = resize(to_rgb_uint8(overlay), img.shape[:2])
    o = float(np.clip(opacity, 0.0, 1.0))
    return ((1 - o) * img.astype(np.float64) + o * ov.astype(np.float64)).round().astype(np.uint8)


def heat_overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, opacity: float) -> np.ndarray:
    """The anomaly map colour-mapped on [vmin, vmax] and blended over the image (map resized to the image)."""
    img = to_rgb_uint8(image)
    m = resize(np.asarray(amap, dtype=np.float32), img.shape[:2])
    return blend(img, colorize(m, vmin, vmax), opacity)


def map_range(maps: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.9) -> tuple[float, float]:
    """Robust (low, high) of a stack of maps by percentiles, so one hot pixel does not wash the scale out."""
    a = np.asarray(maps, dtype=np.float64).reshape(-1)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(a, [low_pct, high_pct])
    if hi <= lo:
        hi = lo + 1e-6
    return float(lo), float(hi)
