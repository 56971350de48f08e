"""Scoring new images with a saved model: `adlab predict MODELS_DIR IMAGES... --method NAME --out OUT`.

OUT/predictions.json (DESIGN §7)::

    {"method", "threshold", "images": [{"path", "score", "verdict", "heatmap"}],
     "threshold_rule", "model", "image_size", "engine_version"}          (the last four are additions)

verdict is "anomalous" when score >= threshold, else "normal". heatmap is the PNG's path relative to OUT (the
map coloured over the image as the dashboard draws it, on the run's colour range), or null for a method without
pixel maps. Images are loaded exactly as the run loaded its test images, so an image of the run's test set gets
the score the run gave it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.api import ConfigError
from engine.cache import ENGINE_VERSION
from engine.data.inputs import InputImage, collect_images
from engine.data.loader import load_files
from engine.heatmap import DEFAULT_OPACITY, heat_overlay, map_range
from engine.saved_models import SavedModel, load_model

BATCH = 64  # images loaded and scored at once (bounds memory on large folders)


@dataclass
class Scored:
    """One scored image: its name, the image at the model's size (S, S, 3) uint8, score and map (S, S) or None."""

    name: str
    image: np.ndarray
    score: float
    map: np.ndarray | None


def score_files(model: SavedModel, items: list[InputImage], batch: int = BATCH) -> Iterator[Scored]:
    """Score checked images (collect_images) with a saved model, in input order, `batch` images at a time."""
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        imgs = load_files([i.path for i in chunk], model.image_shape)
        pred = model.predict(imgs)
        for j, item in enumerate(chunk):
            yield Scored(name=item.name, image=imgs.images[j].permute(1, 2, 0).numpy(),
                         score=float(pred.scores[j]), map=None if pred.maps is None else pred.maps[j].numpy())


def verdict(score: float, threshold: float) -> str:
    """"anomalous" when score >= threshold (the project's one rule), else "normal"."""
    return "anomalous" if score >= threshold else "normal"


def heatmap_image(model: SavedModel, scored: Scored, opacity: float = DEFAULT_OPACITY,
                  colour_range: tuple[float, float] | None = None) -> np.ndarray | None:
    """(S, S, 3) uint8 overlay of an image's map on the run's colour range (as the dashboard's Heatmaps page
    colours that method), or None for a method without maps."""
    if scored.map is None:
        return None
    lo, hi = colour_range or model.map_range or map_range(scored.map)
    return heat_overlay(scored.image, scored.map, lo, hi, opacity)


def _png_name(k: int, name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name.split(":")[-1]).stem)[:60] or "image"
    return f"{k:04d}_{stem}.png"


def predict_to_folder(models_dir: str | Path, images: list[str | Path], *, method: str | None = None,
                      threshold: str | float = "f1", out: str | Path = "adlab-predictions",
                      device: str = "auto") -> dict[str, Any]:
    """Score `images` (files, folders, zips) with a saved model; write OUT/predictions.json and one heatmap PNG
    per image under OUT/heatmaps/. Returns what predictions.json holds.

    Raises ConfigError (model missing, damaged or from another engine version; bad threshold) and
    DataValidationError (every bad input at once) before anything is written.
    """
    model = load_model(models_dir, method, device)
    thr, rule = model.threshold(threshold)
    items = collect_images(list(images))
    out_dir = Path(out)
    try:
        (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to {out_dir}: {e.strerror or e}") from None
    rows = []
    for k, s in enumerate(score_files(model, items)):
        heat = heatmap_image(model, s)
        rel = None
        if heat is not None:
            rel = f"heatmaps/{_png_name(k, s.name)}"
            Image.fromarray(heat).save(out_dir / rel)
        rows.append({"path": s.name, "score": s.score, "verdict": verdict(s.score, thr), "heatmap": rel})
    result = {"method": model.method, "threshold": thr, "images": rows, "threshold_rule": rule,
              "model": str(model.directory), "image_size": model.image_size,
              "image_shape": list(model.image_shape), "engine_version": ENGINE_VERSION}
    tmp = out_dir / ".predictions.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_dir / "predictions.json")
    return result
