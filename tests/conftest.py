"""Shared fixtures: an isolated cache, the sample data as ImageSets at a small size, a tall set with known defects."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test session writes its cache to a fresh temporary folder, never to ~/.cache."""
    os.environ["ADLAB_CACHE"] = str(tmp_path_factory.mktemp("adlab-cache"))


@pytest.fixture(scope="session")
def sample_brick():
    """(train, test) ImageSets of the committed sample 'brick' category at 128 px."""
    from engine.data import discover, load_split

    ds = discover(SAMPLE / "brick")
    return load_split(ds, "train", 128), load_split(ds, "test", 128)


# ------------------------------------------------------------------ a tall set with known defects (issue 17)
TALL_H, TALL_W = 256, 64  # the tall strips' native size (4:1)
H, W = TALL_H, TALL_W
DEFECT_ROWS = (176, 200)  # known defect position (rows, native px) of the square defects
DEFECT_COLS = (24, 44)


def _strip(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a horizontal stripe texture with mild noise."""
    y = np.arange(H)[:, None] / H
    g = 0.5 + 0.15 * np.sin(60 * y) + 0.04 * rng.standard_normal((H, W))
    return np.clip(np.stack([g, g * 0.9, g * 0.8], -1) * 255, 0, 255).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="session")
def tall_strips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tall MVTec-layout set: 10 train, 4 good test, 4 "spot" defects at a known position, 4 "line" defects
    (a 2 px horizontal line across the strip, which a 4:1 squash to a square halves below one pixel)."""
    root = tmp_path_factory.mktemp("tall") / "strips"
    rng = np.random.default_rng(0)
    for i in range(10):
        _save(root / "train/good" / f"{i:03d}.png", _strip(rng))
    for i in range(4):
        _save(root / "test/good" / f"{i:03d}.png", _strip(rng))
    for i in range(4):
        img, mask = _strip(rng), np.zeros((H, W), np.uint8)
        mask[DEFECT_ROWS[0]:DEFECT_ROWS[1], DEFECT_COLS[0]:DEFECT_COLS[1]] = 255
        img[mask > 0] = (230, 40, 40)
        _save(root / "test/spot" / f"{i:03d}.png", img)
        _save(root / "ground_truth/spot" / f"{i:03d}_mask.png", mask)
    for i in range(4):
        img, mask = _strip(rng), np.zeros((H, W), np.uint8)
        y = 43 + 8 * i  # rows 4k+3, 4k+4: a 4:1 nearest-neighbour squash samples rows 4k+2 and misses both
        mask[y:y + 2] = 255
        img[mask > 0] = (20, 20, 20)
        _save(root / "test/line" / f"{i:03d}.png", img)
        _save(root / "ground_truth/line" / f"{i:03d}_mask.png", mask)
    return root
