"""Synthetic anomalies for training (DRAEM, Zavrtanik et al., ICCV 2021; also used by FCDD-style outlier exposure;
the Stain noise of Collin & De Vleeschouwer, ICPR 2020, for the skip-connection autoencoder).

Pipeline (as in DRAEM, Sec. 3.3): a 2-D Perlin noise field with a random scale per axis (2^k cells,
k in [min_scale, max_scale)) is rotated at random and thresholded at 0.5 into a mask M; a texture A
from an anomaly source is cropped, colour/contrast augmented (3 random operations of a list like
DRAEM's imgaug set), and blended into the masked region with a random opacity β ~ U(0, 0.8):

    I_a = (1 - M) ⊙ I + (1 - β) (M ⊙ A) + β (M ⊙ I)

Anomaly source: by default scikit-image's bundled photographs (no download): astronaut, camera, chelsea,
coffee, coins, hubble_deep_field, immunohistochemistry, moon, page, rocket, text, retina. The sample
data's own textures (brick, grass, gravel) are left out so that a test texture is never "the anomaly".
Callers may pass any other source instead, e.g. other training images.

All randomness comes from the given torch.Generator (CPU), so a seed gives the same anomalies.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

# skimage.data loaders whose files ship inside the scikit-image wheel (no network).
SOURCE_IMAGES: tuple[str, ...] = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field", "immunohistochemistry",
    "moon", "page", "rocket", "text", "retina",
)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(batch: int, size: tuple[int, int], res: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Gradient (Perlin) noise: (batch, H, W) float32 in [-1, 1], `res` = (cells along H, cells along W).

    One random unit gradient per lattice corner; quintic fade; vectorised over the batch; scaled by √2 (the
    2-D extreme is √2/2) so the range is [-1, 1], as DRAEM's generator. H and W need not be multiples of res.
    """
    h, w = size
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    ang = torch.rand(batch, ry + 1, rx + 1, generator=generator) * (2 * math.pi)
    grad = torch.stack([torch.cos(ang), torch.sin(ang)], -1)  # (B, ry+1, rx+1, 2)
    u = torch.arange(h, dtype=torch.float32) * (ry / h)
    v = torch.arange(w, dtype=torch.float32) * (rx / w)
    iy, ix = u.floor().long().clamp(max=ry - 1), v.floor().long().clamp(max=rx - 1)
    fy, fx = (u - iy)[:, None].expand(h, w), (v - ix)[None, :].expand(h, w)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = grad[:, (iy + dy)[:, None], (ix + dx)[None, :]]  # (B, H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(0, 1), tx)
    bottom = torch.lerp(corner(1, 0), corner(1, 1), tx)
    return torch.lerp(top, bottom, ty) * math.sqrt(2.0)


def _rotate(maps: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, W) maps about their centres by `degrees` (B,), reflecting at the borders."""
    a = degrees * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, [maps.shape[0], 1, *maps.shape[-2:]], align_corners=False)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[:, 0]


def rotate_images(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate (B, C, H, W) images about their centres by `degrees` (B,), reflecting at the borders."""
    b, c, h, w = images.shape
    return _rotate(images.reshape(b * c, h, w).float(), degrees.repeat_interleave(c)).reshape(b, c, h, w)


def perlin_mask(batch: int, size: tuple[int, int], generator: torch.Generator, *, min_scale: int = 0,
                max_scale: int = 6, threshold: float = 0.5, rotate: bool = True, tries: int = 4) -> torch.Tensor:
    """DRAEM's anomaly masks: (batch, H, W) float32 in {0, 1}.

    Noise with 2^ky x 2^kx cells (ky, kx uniform in [min_scale, max_scale)), rotated by U(-90°, 90°), then
    `> threshold`. An empty mask is redrawn up to `tries` times; if it stays empty the top 2% of its noise
    is taken, so every mask is non-empty.
    """
    h, w = size
    out = torch.zeros(batch, h, w)
    todo = torch.arange(batch)
    for attempt in range(tries + 1):
        if len(todo) == 0:
            break
        k = torch.randint(min_scale, max(min_scale + 1, max_scale), (len(todo), 2), generator=generator)
        noise = torch.empty(len(todo), h, w)
        for pair in torch.unique(k, dim=0):  # one vectorised call per distinct scale
            sel = (k == pair).all(1)
            noise[sel] = perlin_noise(int(sel.sum()), size, (2 ** int(pair[0]), 2 ** int(pair[1])), generator)
        if rotate:
            noise = _rotate(noise, torch.rand(len(todo), generator=generator) * 180 - 90)
        m = (noise > threshold).float()
        if attempt == tries:  # fall back to the top 2% of the last noise draw
            q = torch.quantile(noise.flatten(1), 0.98, dim=1)
            m = torch.maximum(m, (noise >= q[:, None, None]).float())
        out[todo] = m
        todo = todo[m.flatten(1).sum(1) == 0]
    return out


@lru_cache(maxsize=4)
def default_source(size: int = 256) -> torch.Tensor:
    """(M, 3, size, size) float32 in [0, 1]: scikit-image's bundled photographs, centre-cropped and resized."""
    import skimage.data

    imgs = []
    for name in SOURCE_IMAGES:
        a = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        a = a[:, :, :3] / (255.0 if a.max() > 1.0 else 1.0)
        h, w = a.shape[:2]
        s = min(h, w)
        y0, x0 = (h - s) // 2, (w - s) // 2
        t = torch.from_numpy(np.ascontiguousarray(a[y0:y0 + s, x0:x0 + s])).permute(2, 0, 1)[None]
        imgs.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(imgs).clamp(0, 1)


def _u(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator))


def _hue_rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate colours about the grey axis: (3, H, W) -> (3, H, W)."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    k = 1 / 3
    sq = math.sqrt(k)
    m = torch.tensor([[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                      [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
                      [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]])
    return torch.einsum("ij,jhw->ihw", m, x)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Three random colour/contrast/geometry operations (like DRAEM's imgaug list): (3, H, W) -> (3, H, W)."""
    ops = torch.randperm(10, generator=g)[:3].tolist()
    for op in ops:
        if op == 0:  # gamma contrast
            x = x.clamp_min(0).pow(_u(g, 0.5, 2.0))
        elif op == 1:  # multiply and add to brightness
            x = x * _u(g, 0.8, 1.2) + _u(g, -0.12, 0.12)
        elif op == 2:  # sharpen (unsharp mask)
            blur = F.avg_pool2d(F.pad(x[None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0]
            x = x + _u(g, 0.5, 2.0) * (x - blur)
        elif op == 3:  # hue rotation
            x = _hue_rotate(x, _u(g, -50, 50))
        elif op == 4:  # solarize
            t = _u(g, 0.125, 0.5)
            x = torch.where(x > t, 1 - x, x)
        elif op == 5:  # posterize
            levels = 2 ** int(torch.randint(2, 5, (), generator=g))
            x = torch.floor(x.clamp(0, 1) * levels).clamp(max=levels - 1) / (levels - 1)
        elif op == 6:  # invert
            x = 1 - x
        elif op == 7:  # autocontrast
            lo = x.amin((1, 2), keepdim=True)
            hi = x.amax((1, 2), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-3)
        elif op == 8:  # channel shuffle
            x = x[torch.randperm(3, generator=g)]
        else:  # affine: rot90 / flip
            k = int(torch.randint(0, 4, (), generator=g))
            if x.shape[1] != x.shape[2] and k % 2:
                k += 1  # a quarter turn would swap a non-square texture's height and width: turn it by a half
            x = torch.rot90(x, k, (1, 2))
        x = x.clamp(0, 1)
    return x


def _texture(source: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A random crop (30-100% of the side) of a random source image, resized and augmented: (3, H, W)."""
    j = int(torch.randint(0, source.shape[0], (), generator=g))
    src = source[j]
    sh, sw = src.shape[-2:]
    side = max(8, int(min(sh, sw) * _u(g, 0.3, 1.0)))
    y0 = int(torch.randint(0, sh - side + 1, (), generator=g))
    x0 = int(torch.randint(0, sw - side + 1, (), generator=g))
    crop = src[None, :, y0:y0 + side, x0:x0 + side].float()
    crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=side > min(size))[0]
    return _augment(crop.clamp(0, 1), g)


def make_anomalies(images: torch.Tensor, generator: torch.Generator, source: torch.Tensor | None = None, *,
                   p: float = 1.0, beta_max: float = 0.8, min_scale: int = 0,
                   max_scale: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste DRAEM-style synthetic anomalies into `images`.

    images: (B, 3, H, W) float in [0, 1]. source: (M, 3, H', W') float in [0, 1] textures to paste, or None
    for `default_source()` (scikit-image's bundled photographs). p: probability that an image gets an
    anomaly (DRAEM trains with p = 0.5); the others are returned unchanged with an empty mask.
    Returns (augmented (B, 3, H, W) float32 in [0, 1], masks (B, H, W) float32 in {0, 1}); pixels outside the
    mask are exactly the input's. Deterministic given the generator's state.
    """
    b, _, h, w = images.shape
    images = images.float()
    src = default_source() if source is None else source
    dev = images.device
    masks = perlin_mask(b, (h, w), generator, min_scale=min_scale, max_scale=max_scale)
    keep = torch.rand(b, generator=generator) < p
    masks = masks * keep[:, None, None].float()
    out = images.clone()
    for i in range(b):
        if not bool(keep[i]):
            continue
        tex = _texture(src.detach().cpu(), (h, w), generator).to(dev)
        beta = _u(generator, 0.0, beta_max)
        m = masks[i].to(dev).bool()[None].expand_as(tex)
        blended = (1 - beta) * tex + beta * images[i]
        out[i] = torch.where(m, blended, images[i])
    return out.clamp(0, 1), masks.to(dev)


def _periodic_catmull_rom(knots: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Closed cubic (Catmull–Rom) curve through `knots` (K,) at uniform positions 0..K-1, evaluated at t in
    [0, K) (any shape); wraps around so the curve is periodic."""
    k = knots.shape[0]
    i = t.floor().long()
    u = t - i
    p0, p1, p2, p3 = (knots[(i + d) % k] for d in (-1, 0, 1, 2))
    return 0.5 * (2 * p1 + (p2 - p0) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u * u
                  + (3 * p1 - p0 - 3 * p2 + p3) * u * u * u)


def stain_mask(size: tuple[int, int], generator: torch.Generator, *, size_range: tuple[float, float] = (0.01, 0.12),
               irregularity: float = 0.1, blur: float = 0.15, points: int = 20) -> torch.Tensor:
    """One Stain shape (Collin & De Vleeschouwer, ICPR 2020): (H, W) float32 in [0, 1].

    An ellipse with semi-axes drawn in `size_range` × the smaller image side and a random rotation, placed
    wholly inside the image; its border is sampled at `points` angles, each radius moved by up to
    ±irregularity × the mean semi-axis, and closed by a periodic cubic through those points; the filled shape
    is blurred with σ = blur × the larger semi-axis (soft edges). The authors perturb the border points in x
    and y and fill the polygon; moving them along the radius keeps the shape star-shaped and vectorised.
    """
    h, w = size
    side = min(h, w)
    lo, hi = max(1, int(size_range[0] * side)), max(1, int(size_range[1] * side))
    a, b = (int(torch.randint(lo, hi + 1, (), generator=generator)) for _ in range(2))
    rot = _u(generator, 0.0, 2 * math.pi)
    r_max = max(a, b)
    cy = int(torch.randint(min(r_max, h // 2), max(min(r_max, h // 2), h - r_max) + 1, (), generator=generator))
    cx = int(torch.randint(min(r_max, w // 2), max(min(r_max, w // 2), w - r_max) + 1, (), generator=generator))
    phi = torch.arange(points, dtype=torch.float32) * (2 * math.pi / points)
    radius = a * b / torch.sqrt((b * torch.cos(phi - rot)) ** 2 + (a * torch.sin(phi - rot)) ** 2)
    jitter = irregularity * (a + b) / 2
    radius = (radius + (torch.rand(points, generator=generator) * 2 - 1) * jitter).clamp_min(0.5)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - cy, torch.arange(w, dtype=torch.float32) - cx,
                            indexing="ij")
    angle = torch.atan2(yy, xx) % (2 * math.pi)
    border = _periodic_catmull_rom(radius, (angle * (points / (2 * math.pi))).clamp(max=points - 1e-4))
    mask = (torch.sqrt(yy * yy + xx * xx) <= border).float()
    if blur > 0:
        from engine.components.anomaly_map import gaussian_blur

        mask = gaussian_blur(mask[None], blur * r_max)[0]
    return mask.clamp(0, 1)


def stain_noise(images: torch.Tensor, generator: torch.Generator, *, size_range: tuple[float, float] = (0.01, 0.12),
                grey_range: tuple[float, float] = (10 / 255, 220 / 255), noise_std: float = math.sqrt(0.05 / 255),
                irregularity: float = 0.1, blur: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt every image with one Stain (Collin & De Vleeschouwer, ICPR 2020): a blob of one random grey level
    (uniform in `grey_range`, plus Gaussian noise of std `noise_std` per pixel and channel, as the authors'
    variance 0.05/255) blended in through the soft `stain_mask`:  I_s = (1 − m)·I + m·stain.

    images: (B, C, H, W) float in [0, 1]. Returns (corrupted (B, C, H, W) in [0, 1], masks (B, H, W) in [0, 1]);
    pixels where m = 0 are exactly the input's. Deterministic given the generator's state.
    """
    b, c, h, w = images.shape
    images = images.float()
    out = images.clone()
    masks = torch.zeros(b, h, w, device=images.device)
    for i in range(b):
        m = stain_mask((h, w), generator, size_range=size_range, irregularity=irregularity, blur=blur)
        grey = _u(generator, *grey_range)
        stain = (grey + noise_std * torch.randn(c, h, w, generator=generator)).clamp(0, 1)
        m, stain = m.to(images.device), stain.to(images.device)
        out[i] = torch.where(m > 0, (1 - m) * images[i] + m * stain, images[i])
        masks[i] = m
    return out.clamp(0, 1), masks
