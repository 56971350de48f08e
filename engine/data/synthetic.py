"""Synthetic MVTec-layout datasets made from scikit-image's bundled texture photographs.

Normal images are random windows of a texture (random offset, scale, small rotation, flips, brightness),
tinted to a colour per category. Defects are drawn by this module with exact masks (0/255 PNG):
    scratch  thin bright or dark polyline
    stain    irregular blotch of changed colour with a soft edge
    hole     dark ellipse with a bright rim
Everything is deterministic in (category, seed, split, index): one image does not change when the
number of other images changes. Arrays inside are float32 (H, W, 3) in [0, 1]; masks (H, W) bool.
"""

from __future__ import annotations

import shutil
import uuid
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.api import ConfigError

SAMPLE_CATEGORIES: list[str] = ["brick", "grass", "gravel"]
DEFECT_TYPES: tuple[str, ...] = ("scratch", "stain", "hole")

_TINT: dict[str, tuple[float, float, float]] = {
    "brick": (1.00, 0.60, 0.46),
    "grass": (0.58, 0.92, 0.42),
    "gravel": (0.95, 0.90, 0.80),
}
_STAIN_COLOURS: list[tuple[float, float, float]] = [
    (0.35, 0.22, 0.10),  # dark brown
    (0.20, 0.30, 0.55),  # bluish
    (1.00, 0.55, 0.15),  # rust
    (0.30, 0.55, 0.25),  # mould green
]
_SPLIT_CODE = {"train": 1, "test_good": 2, "scratch": 3, "stain": 4, "hole": 5}


@lru_cache(maxsize=8)
def _texture(category: str) -> np.ndarray:
    """(512, 512) float32 grey texture in [0, 1] from skimage.data."""
    import skimage.data

    if category not in _TINT:
        raise ConfigError(f"unknown synthetic category {category!r}; choose from {', '.join(_TINT)}")
    t = np.asarray(getattr(skimage.data, category)(), dtype=np.float32)
    if t.ndim == 3:
        t = t[..., :3].mean(axis=2)
    return t / 255.0


def _rng(seed: int, category: str, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLIT_CODE.get(kind, 9), index])


def _normal_image(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of the texture: (size, size, 3) float32 in [0, 1]."""
    tex = _texture(category)
    th, tw = tex.shape
    side = int(min(th, tw) * rng.uniform(0.34, 0.42))  # window side in texture pixels
    big = int(np.ceil(side * 1.25))  # room for rotation
    y0 = int(rng.integers(0, th - big + 1))
    x0 = int(rng.integers(0, tw - big + 1))
    win = Image.fromarray(tex[y0 : y0 + big, x0 : x0 + big], "F")
    angle = float(rng.uniform(-8.0, 8.0))
    win = win.rotate(angle, resample=Image.Resampling.BILINEAR)
    off = (big - side) // 2
    win = win.crop((off, off, off + side, off + side)).resize((size, size), Image.Resampling.BILINEAR)
    g = np.asarray(win, dtype=np.float32)
    if rng.random() < 0.5:
        g = g[:, ::-1]
    if category != "brick" and rng.random() < 0.5:
        g = g[::-1, :]
    mean = float(g.mean())
    g = (g - mean) * rng.uniform(0.95, 1.05) + mean + rng.uniform(-0.02, 0.02)
    rgb = np.clip(g[:, :, None] * np.asarray(_TINT[category], np.float32) * 1.05, 0.0, 1.0)
    return np.ascontiguousarray(rgb, dtype=np.float32)


def _supersampled_alpha(size: int, draw: Callable[[ImageDraw.ImageDraw, int], None], ss: int = 4) -> np.ndarray:
    """Draw at ss x resolution and box-filter down: (size, size) float32 coverage in [0, 1]."""
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw(ImageDraw.Draw(canvas), ss)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    n = int(rng.integers(3, 6))
    pts = [rng.uniform(0.2, 0.8, 2) * size]
    ang = rng.uniform(0, 2 * np.pi)
    lo, hi = 0.06 * size, 0.94 * size
    for _ in range(n):
        ang += rng.uniform(-0.6, 0.6)
        step = rng.uniform(0.12, 0.25) * size
        nxt = pts[-1] + step * np.array([np.cos(ang), np.sin(ang)])
        if not (lo <= nxt[0] <= hi and lo <= nxt[1] <= hi):  # turn back instead of running off the image
            ang += np.pi
            nxt = np.clip(pts[-1] + step * np.array([np.cos(ang), np.sin(ang)]), lo, hi)
        pts.append(nxt)
    width = rng.uniform(2.2, 3.6) * size / 128

    def draw(d: ImageDraw.ImageDraw, ss: int) -> None:
        d.line([(float(x) * ss, float(y) * ss) for x, y in pts], fill=255, width=max(1, round(width * ss)),
               joint="curve")

    alpha = _supersampled_alpha(size, draw)
    bright = rng.random() < 0.5
    colour = np.float32(0.97 if bright else 0.04)
    k = np.float32(rng.uniform(0.65, 0.95))
    a = (alpha * k)[:, :, None]
    return img * (1 - a) + colour * a, alpha > 0.3


def _stain(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    r0 = rng.uniform(0.10, 0.18) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    radius = np.full_like(theta, r0)
    for k in (2, 3, 5):
        radius += r0 * rng.uniform(0.05, 0.18) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    rel = np.sqrt(dx * dx + dy * dy) / radius
    alpha = np.clip((1.0 - rel) / 0.35, 0.0, 1.0)  # soft edge over the outer 35% of the radius
    # A stain must differ in hue from the surface it lands on (rust on red brick is invisible).
    base = img.reshape(-1, 3).mean(axis=0)
    palette = np.asarray(_STAIN_COLOURS, np.float32)
    cos = palette @ base / (np.linalg.norm(palette, axis=1) * np.linalg.norm(base) + 1e-8)
    palette = palette[cos < 0.95] if (cos < 0.95).any() else palette
    colour = palette[int(rng.integers(len(palette)))]
    stained = np.clip(img.mean(axis=2, keepdims=True) * colour * 1.7, 0.0, 1.0)
    k = np.float32(rng.uniform(0.6, 0.9))
    a = (alpha * k)[:, :, None]
    return img * (1 - a) + stained * a, alpha > 0.3


def _hole(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    cy, cx = rng.uniform(0.2, 0.8, 2) * size
    ra = rng.uniform(0.05, 0.1) * size
    rb = ra * rng.uniform(0.6, 1.0)
    phi = rng.uniform(0, np.pi)
    rim = rng.uniform(1.2, 2.2) * size / 128
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(phi) + dy * np.sin(phi)) / ra
    v = (-dx * np.sin(phi) + dy * np.cos(phi)) / rb
    rho = np.sqrt(u * u + v * v)
    px = 1.0 / rb  # one pixel in normalised units (along the short axis)
    inside = np.clip((1.0 - rho) / px + 0.5, 0.0, 1.0)
    ring_out = np.clip((1.0 + rim * px - rho) / px + 0.5, 0.0, 1.0)
    ring = np.clip(ring_out - inside, 0.0, 1.0)
    depth = np.float32(rng.uniform(0.03, 0.12))
    dark = img * 0.15 + depth
    light = np.clip(img * 0.55 + 0.45, 0.0, 1.0)
    out = img * (1 - inside[:, :, None]) + dark * inside[:, :, None]
    out = out * (1 - ring[:, :, None]) + light * ring[:, :, None]
    return out, ring_out > 0.5


_DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "stain": _stain,
    "hole": _hole,
}


def _to_png(path: Path, arr: np.ndarray) -> None:
    """float (H, W, 3) in [0, 1] or bool (H, W) -> 8-bit PNG (masks 0/255)."""
    if arr.dtype == bool:
        im = Image.fromarray(arr.astype(np.uint8) * 255, "L")
    else:
        im = Image.fromarray(np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8), "RGB")
    im.save(path, format="PNG", compress_level=9)


def make_synthetic_dataset(
    out_dir: str | Path,
    category: str,
    *,
    n_train: int = 20,
    n_test_good: int = 8,
    n_defect_per_type: int = 6,
    size: int = 128,
    seed: int = 0,
    defect_types: tuple[str, ...] = DEFECT_TYPES,
) -> Path:
    """Write an MVTec-layout dataset ``out_dir/<category>`` and return its path.

    category: a texture of skimage.data ("brick", "grass", "gravel"). Images are size x size RGB PNG;
    test/<defect>/NNN.png has ground_truth/<defect>/NNN_mask.png (0/255). An existing folder of that
    name is replaced (the new one is built beside it and renamed into place).
    """
    if size < 16:
        raise ConfigError(f"size must be at least 16, got {size}")
    unknown = [d for d in defect_types if d not in _DEFECTS]
    if unknown:
        raise ConfigError(f"unknown defect types {unknown}; choose from {', '.join(_DEFECTS)}")
    _texture(category)  # validates the category early
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / category
    tmp = out / f".{category}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("train/good", "test/good", *(f"test/{d}" for d in defect_types),
                    *(f"ground_truth/{d}" for d in defect_types)):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            rng = _rng(seed, category, "train", i)
            _to_png(tmp / "train/good" / f"{i:03d}.png", _normal_image(category, size, rng))
        for i in range(n_test_good):
            rng = _rng(seed, category, "test_good", i)
            _to_png(tmp / "test/good" / f"{i:03d}.png", _normal_image(category, size, rng))
        for d in defect_types:
            for i in range(n_defect_per_type):
                rng = _rng(seed, category, d, i)
                img, mask = _DEFECTS[d](_normal_image(category, size, rng), rng)
                _to_png(tmp / "test" / d / f"{i:03d}.png", img)
                _to_png(tmp / "ground_truth" / d / f"{i:03d}_mask.png", mask)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def make_sample_data(out_dir: str | Path) -> list[Path]:
    """Write the project's sample data (every category of SAMPLE_CATEGORIES, default sizes) under ``out_dir``."""
    return [make_synthetic_dataset(out_dir, c) for c in SAMPLE_CATEGORIES]
