"""Cutting images into overlapping square tiles and stitching per-tile maps back (issue 17).

A tile is just an image: every method fits and predicts on an ImageSet of tiles through the Detector contract,
and the base class (engine.methods.base) stitches the maps back. Tile sets get their own content digest (derived
from the image set's and the grid), so backbone features are cached per tile set, and a subset of images (the
test set minus labelled anomalies) maps onto the rows of its full set's tiles.

Shapes: images (N, 3, H, W); tiles (N*T, 3, t, t), image-major (the T tiles of image 0 first, row by row);
per-tile maps (N*T, t, t) -> stitched maps (N, H, W); per-tile scores (N*T,) -> image scores (N,) by max.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from engine.api import ImageSet
from engine.data.geometry import DEFAULT_OVERLAP, tile_positions, tile_side


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an (H, W) image lie: tile side `tile`, row starts `ys`, column starts `xs`."""

    shape: tuple[int, int]
    tile: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def n(self) -> int:
        """Tiles per image."""
        return len(self.ys) * len(self.xs)

    def boxes(self) -> list[tuple[int, int]]:
        """(y, x) top-left corner of every tile, row by row."""
        return [(y, x) for y in self.ys for x in self.xs]

    def key(self) -> str:
        return f"tiles{self.tile}|{self.shape}|{self.ys}|{self.xs}"


def make_grid(shape: tuple[int, int], tile: int, overlap: float = DEFAULT_OVERLAP) -> TileGrid:
    """The grid of `tile` px squares (the short side when the image is smaller) covering an (H, W) image."""
    t = tile_side(shape, tile)
    return TileGrid(shape=(int(shape[0]), int(shape[1])), tile=t, ys=tuple(tile_positions(shape[0], t, overlap)),
                    xs=tuple(tile_positions(shape[1], t, overlap)))


def _tile_digest(digest: str, grid: TileGrid) -> str:
    return hashlib.sha256(f"{digest}|{grid.key()}".encode()).hexdigest()[:32]


def cut(x: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(N, ..., H, W) -> (N*T, ..., t, t), image-major."""
    t = grid.tile
    parts = [x[..., y:y + t, c:c + t] for y, c in grid.boxes()]
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:-2], t, t)


def tile_images(images: ImageSet, grid: TileGrid) -> ImageSet:
    """The tiles of every image as one ImageSet (N*T images of t x t).

    A tile's mask is the image's mask cut the same way; its label is 1 when its mask has a defect pixel, or, when
    the image has no real mask, the image's label. Paths name the tile ("<path>#tile<k>").
    """
    if images.size != grid.shape:
        raise ValueError(f"images are {images.size}, the tile grid was made for {grid.shape}")
    assert images.labels is not None and images.has_mask is not None
    n, t = grid.n, grid.tile
    masks = None if images.masks is None else cut(images.masks, grid)
    has_mask = images.has_mask.repeat_interleave(n)
    labels = images.labels.repeat_interleave(n)
    if masks is not None:
        in_tile = masks.reshape(-1, t * t).amax(1).to(torch.int64)
        labels = torch.where(has_mask, in_tile, labels)
    defect_types = [d if int(y) == 1 else "good" for d, y in
                    zip([d for d in images.defect_types for _ in range(n)], labels.tolist(), strict=True)]
    origin = None
    if images.origin is not None:
        parent, rows = images.origin
        origin = (_tile_digest(parent, grid), tuple(r * n + k for r in rows for k in range(n)))
    return ImageSet(images=cut(images.images, grid), labels=labels, masks=masks,
                    paths=[f"{p}#tile{k}" for p in images.paths for k in range(n)], defect_types=defect_types,
                    has_mask=has_mask, digest=_tile_digest(images.digest, grid), origin=origin)


def stitch_maps(maps: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(N*T, t, t) per-tile maps -> (N, H, W), overlapping tiles averaged."""
    t = grid.tile
    if maps.shape[-2:] != (t, t):
        raise ValueError(f"tile maps are {tuple(maps.shape[-2:])}, tiles are {t}x{t}")
    per = maps.reshape(-1, grid.n, t, t).float()
    out = torch.zeros(per.shape[0], *grid.shape)
    count = torch.zeros(grid.shape)
    for k, (y, x) in enumerate(grid.boxes()):
        out[:, y:y + t, x:x + t] += per[:, k]
        count[y:y + t, x:x + t] += 1
    return out / count


def max_per_image(scores: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """(N*T,) tile scores -> (N,) image scores, the max over each image's tiles."""
    return scores.reshape(-1, grid.n).amax(1)
