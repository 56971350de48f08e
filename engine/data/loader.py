"""Loading a split of a validated Dataset into an ImageSet at the working resolution.

Output shapes (N images; H x W = image_size, an int S meaning S x S, or an (H, W) pair from
Dataset.working_shape for keep-aspect loading):
    images   (N, 3, H, W) uint8 RGB, bilinear with antialiasing
    masks    (N, H, W) uint8 {0, 1}, nearest-neighbour; None when the dataset has no masks at all
    has_mask (N,) bool: True for good images and for defect images with a mask
    labels   (N,) int64
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from engine.api import DataValidationError, ImageSet, Problem
from engine.data.discover import Dataset, Sample
from engine.data.limits import Limits
from engine.data.validate import image_to_rgb, mask_to_binary, open_image

# Files were checked at discover time; loading only refuses what cannot be decoded at all.
_LOAD_LIMITS = Limits(max_image_pixels=1 << 62)


Shape = int | tuple[int, int]


def as_shape(size: Shape) -> tuple[int, int]:
    """(H, W) of a size given as a side S (square) or an (H, W) pair; ValueError when not positive."""
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {size}")
    return h, w


def _load_image(path: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 RGB."""
    h, w = shape
    with open_image(_path_bytes(path), _LOAD_LIMITS) as im:
        if im.format == "JPEG" and im.mode in ("RGB", "L"):
            im.draft(im.mode, (w, h))  # JPEG can decode at 1/2, 1/4, 1/8 scale: faster for big files
        rgb = image_to_rgb(im)
    if rgb.shape[0] == h and rgb.shape[1] == w:
        return np.ascontiguousarray(rgb)
    out = Image.fromarray(rgb, "RGB").resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def _load_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 1}."""
    h, w = shape
    with open_image(_path_bytes(path), _LOAD_LIMITS) as im:
        binary, _ = mask_to_binary(im)
    m = Image.fromarray(binary.astype(np.uint8) * 255, "L")
    if m.size != (w, h):
        m = m.resize((w, h), Image.Resampling.NEAREST)
    return (np.asarray(m) > 127).astype(np.uint8)


def _path_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _load_one(sample: Sample, shape: tuple[int, int], with_masks: bool) -> tuple[np.ndarray, np.ndarray | None, bool]:
    img = _load_image(sample.path, shape)
    if not with_masks:
        return img, None, False
    if sample.mask_path is not None:
        return img, _load_mask(sample.mask_path, shape), True
    return img, np.zeros(shape, np.uint8), sample.label == 0


def load_split(ds: Dataset, split: str, image_size: Shape = 256, *, indices: list[int] | None = None) -> ImageSet:
    """Load split "train" or "test" of ``ds`` (optionally only rows ``indices``) as an ImageSet.

    Images of any mode become RGB uint8 at image_size (S x S, or H x W for a pair). When ``ds.has_masks`` is
    False, masks is None and has_mask is all False. Otherwise masks are {0,1}: good images get zeros with has_mask True,
    defect images without a mask get zeros with has_mask False.
    digest = sha256(ds.digest|split|size|indices)[:32], size being S for square shapes (as before shapes were
    added) and "HxW" otherwise. Raises DataValidationError if a file can no longer be read.
    """
    samples = ds.split(split)
    shape = as_shape(image_size)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(samples)]
        if bad:
            raise IndexError(f"indices {bad[:5]} out of range for the {split} split of {len(samples)} images")
        samples = [samples[i] for i in indices]
    with_masks = ds.has_masks
    n = len(samples)
    images = np.zeros((n, *shape, 3), np.uint8)
    masks = np.zeros((n, *shape), np.uint8) if with_masks else None
    has_mask = np.zeros(n, bool)
    problems: list[Problem] = []

    def work(i: int) -> None:
        s = samples[i]
        try:
            img, mask, hm = _load_one(s, shape, with_masks)
        except Exception as e:  # a file changed or vanished since discover
            problems.append(Problem(s.path, f"cannot load ({type(e).__name__}: {e})", "run discover again"))
            return
        images[i] = img
        if masks is not None and mask is not None:
            masks[i] = mask
        has_mask[i] = hm

    workers = max(1, min(8, os.cpu_count() or 2, n))
    if n:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, range(n)))
    if problems:
        raise DataValidationError(sorted(problems, key=lambda p: p.path))
    size_key = shape[0] if shape[0] == shape[1] else f"{shape[0]}x{shape[1]}"
    key = f"{ds.digest}|{split}|{size_key}|{indices}"
    return ImageSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        labels=torch.tensor([s.label for s in samples], dtype=torch.int64),
        masks=None if masks is None else torch.from_numpy(masks),
        paths=[s.path for s in samples],
        defect_types=[s.defect_type for s in samples],
        has_mask=torch.from_numpy(has_mask),
        digest=hashlib.sha256(key.encode()).hexdigest()[:32],
        reload=functools.partial(_reload_pixels, ds, split, image_size, indices),
    )


def _reload_pixels(ds: Dataset, split: str, image_size: Shape, indices: list[int] | None,
                   rows: Sequence[int] | None = None) -> torch.Tensor:
    """The pixels load_split gave (only `rows` of them when given), read again from the files (ImageSet.release)."""
    samples = ds.split(split)
    chosen = list(range(len(samples))) if indices is None else indices
    if rows is not None:
        chosen = [chosen[r] for r in rows]
    return read_pixels([samples[i].path for i in chosen], as_shape(image_size), "run discover again")


def read_pixels(paths: list[str], shape: tuple[int, int], fix: str = "check the file") -> torch.Tensor:
    """(N, 3, H, W) uint8 RGB of `paths` at `shape`, decoded and resized as load_split does. Raises
    DataValidationError naming every file that cannot be read, with `fix` as what to do."""
    n = len(paths)
    images = np.zeros((n, *shape, 3), np.uint8)
    problems: list[Problem] = []

    def work(i: int) -> None:
        try:
            images[i] = _load_image(paths[i], shape)
        except Exception as e:  # noqa: BLE001 - reported per file
            problems.append(Problem(paths[i], f"cannot load ({type(e).__name__}: {e})", fix))

    if n:
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 2, n))) as pool:
            list(pool.map(work, range(n)))
    if problems:
        raise DataValidationError(sorted(problems, key=lambda p: p.path))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def load_files(paths: list[str], image_size: Shape) -> ImageSet:
    """Images from files (no labels) at ``image_size`` (S x S, or an (H, W) pair), decoded and resized exactly as
    load_split does for a dataset's images, so a model scores a file here as it scored it in its run.

    Returns an ImageSet: images (N, 3, H, W) uint8, labels all 0, paths as given. Raises DataValidationError
    (every file that cannot be read) and ValueError for a non-positive size.
    """
    shape = as_shape(image_size)
    n = len(paths)
    images = read_pixels(list(paths), shape)
    return ImageSet(images=images, paths=list(paths),
                    defect_types=["unknown"] * n)
