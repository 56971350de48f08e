"""Working geometry of a dataset: how its images are resized (square or keeping the aspect ratio) and tiled.

Torch-free (the dashboard's Data page and the CLI's light commands import it). Sizes are (width, height) as PIL
reports them; shapes are (height, width) as tensors hold them.

- ``square``: every image becomes S x S (the project's behaviour before issue 17: non-square images are squashed).
- ``keep-aspect``: the short side becomes S and the long side follows the dataset's median aspect ratio, rounded
  to a multiple of STRIDE (the backbones' coarsest stride). Images of one dataset share one working shape (they
  are batched in one tensor), so an image whose own aspect differs from the median is still stretched by the
  ratio of the two (`stretch`); for the usual case, one camera and one size, nothing is distorted. Letterboxing
  each image into the shared shape (padding plus a valid-pixel mask for the metrics) would remove that; not done.
- ``tile``: the images (at the working shape) are cut into overlapping tile x tile squares; every method works on
  tiles and their maps are stitched back (overlaps averaged); the image score is the max over its tiles.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

RESIZE_MODES = ("square", "keep-aspect")
DEFAULT_RESIZE = "keep-aspect"
STRIDE = 32
DEFAULT_SIDE = 256
MIN_SIDE = 64
MAX_NATIVE_SIDE = 2048  # tiling at native resolution: the short side is capped here (memory)
DEFAULT_OVERLAP = 0.25
# A median aspect ratio closer to 1 than this counts as square data (keep-aspect then equals square).
SQUARE_TOLERANCE = 0.02


def check_resize(resize: str) -> str:
    """The resize mode, validated; raises ValueError naming the allowed modes."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    return resize


def check_tile(tile: int | None, overlap: float = DEFAULT_OVERLAP) -> None:
    """Raises ValueError for a tile side under MIN_SIDE / 2 or an overlap outside [0, 0.75]."""
    if tile is not None and (not isinstance(tile, int) or tile < MIN_SIDE // 2):
        raise ValueError(f"tile must be an integer of at least {MIN_SIDE // 2} px, got {tile!r}")
    if not 0.0 <= overlap <= 0.75:
        raise ValueError(f"tile overlap must be between 0 and 0.75, got {overlap}")


@dataclass(frozen=True)
class SizeSummary:
    """The distribution of image sizes (width, height) of a dataset."""

    n: int
    median_w: int
    median_h: int
    min_w: int
    min_h: int
    max_w: int
    max_h: int
    n_distinct: int
    aspect: float  # median of width / height
    aspect_min: float
    aspect_max: float

    @property
    def square(self) -> bool:
        return abs(math.log(self.aspect)) <= SQUARE_TOLERANCE

    @property
    def short_side(self) -> int:
        return min(self.median_w, self.median_h)


def summarize_sizes(sizes: list[tuple[int, int]]) -> SizeSummary | None:
    """Summary of (width, height) pairs; None when there are none."""
    sizes = [(int(w), int(h)) for w, h in sizes if w and h]
    if not sizes:
        return None
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    aspects = [w / h for w, h in sizes]
    return SizeSummary(n=len(sizes), median_w=int(statistics.median(ws)), median_h=int(statistics.median(hs)),
                       min_w=min(ws), min_h=min(hs), max_w=max(ws), max_h=max(hs), n_distinct=len(set(sizes)),
                       aspect=float(statistics.median(aspects)), aspect_min=min(aspects), aspect_max=max(aspects))


def _round_stride(x: float) -> int:
    return max(STRIDE, int(round(x / STRIDE)) * STRIDE)


def default_side(summary: SizeSummary | None, tile: int | None = None, cap: int = DEFAULT_SIDE) -> int:
    """The working short side when none is given: `cap`, or the images' own short side when smaller (never
    upsampling), a multiple of STRIDE, at least MIN_SIDE. When tiling, the images' native short side (capped at
    MAX_NATIVE_SIDE): tiles then see the pixels at their own resolution."""
    if summary is None:
        return cap
    own = summary.short_side
    if tile is not None:
        return max(MIN_SIDE, min(own, MAX_NATIVE_SIDE) // STRIDE * STRIDE)
    return max(MIN_SIDE, min(cap, own) // STRIDE * STRIDE)


def working_shape(summary: SizeSummary | None, image_size: int, resize: str = DEFAULT_RESIZE) -> tuple[int, int]:
    """(H, W) every image is resized to: `image_size` square, or `image_size` on the short side with the long side
    in the median aspect ratio (rounded to a multiple of STRIDE; exactly `image_size` for square data)."""
    check_resize(resize)
    if resize == "square" or summary is None or summary.square:
        return image_size, image_size
    if summary.aspect > 1:  # wide
        return image_size, max(image_size, _round_stride(image_size * summary.aspect))
    return max(image_size, _round_stride(image_size / summary.aspect)), image_size


def tile_positions(length: int, tile: int, overlap: float = DEFAULT_OVERLAP) -> list[int]:
    """Start offsets of tiles of `tile` px covering [0, length): evenly spread, first at 0, last at length - tile,
    neighbours overlapping by at least `overlap` of a tile. One tile at 0 when length <= tile."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / step) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_side(shape: tuple[int, int], tile: int) -> int:
    """The tile side used on images of `shape` (H, W): `tile`, or the short side when the image is smaller."""
    return min(tile, shape[0], shape[1])


def tiles_per_image(shape: tuple[int, int], tile: int, overlap: float = DEFAULT_OVERLAP) -> int:
    t = tile_side(shape, tile)
    return len(tile_positions(shape[0], t, overlap)) * len(tile_positions(shape[1], t, overlap))


def work_units(shape: tuple[int, int], tile: int | None, overlap: float = DEFAULT_OVERLAP) -> tuple[int, float]:
    """(images a method sees per dataset image, side of an equally large square image): what the estimates scale
    by. (1, sqrt(H*W)) without tiling; (tiles per image, tile side) with it."""
    if tile is None:
        return 1, math.sqrt(shape[0] * shape[1])
    return tiles_per_image(shape, tile, overlap), float(tile_side(shape, tile))


def suggestion(summary: SizeSummary | None, image_size: int = DEFAULT_SIDE) -> str:
    """One line for the Data page: the images' size and what setting suits them.

    e.g. "images are 1260×500 (W×H): keep aspect at 256 → 640×256, or tile 256 (3×1 tiles of native 500 px)".
    """
    if summary is None:
        return "no images"
    s = summary
    size = (f"{s.median_w}×{s.median_h}" if s.n_distinct == 1
            else f"{s.n_distinct} sizes from {s.min_w}×{s.min_h} to {s.max_w}×{s.max_h} (median {s.median_w}×"
                 f"{s.median_h})")
    side = default_side(s, cap=image_size)
    h, w = working_shape(s, side, "keep-aspect")
    spread = s.aspect_max / s.aspect_min
    parts = [f"images are {size} (W×H)"]
    if s.square:
        parts.append(f"square: {side}×{side}")
    else:
        parts.append(f"keep aspect at {side} → {w}×{h} (square would squash them {max(s.aspect, 1 / s.aspect):.2g}:1)")
    native = default_side(s, tile=image_size)
    if native > 1.25 * image_size:  # resizing to image_size would throw away pixels: tiles keep them
        nh, nw = working_shape(s, native, "keep-aspect")
        t = tiles_per_image((nh, nw), image_size)
        parts.append(f"or tile {image_size} ({t} tiles per image at native {nw}×{nh}: small defects keep their pixels)")
    text = "; ".join(parts[:1]) + ": " + ", ".join(parts[1:])
    if spread > 1.25:
        keep, square = stretch(s, "keep-aspect"), stretch(s, "square")
        text += (f". Aspect ratios vary ({s.aspect_min:.2f} to {s.aspect_max:.2f} W/H) and all images share one "
                 f"shape: the most unusual are stretched up to {keep:.2g}:1 keeping the median aspect "
                 f"({square:.2g}:1 squared)")
    return text


def stretch(summary: SizeSummary, resize: str) -> float:
    """The largest factor by which one image's aspect ratio is distorted when every image takes the working shape
    of `resize` (1.0: none)."""
    target = 1.0 if resize == "square" or summary.square else summary.aspect
    return max(summary.aspect_max / target, target / summary.aspect_min)
