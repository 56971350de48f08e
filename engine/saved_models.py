"""Saved models: a fitted method written to a folder so new images can be scored later (`adlab predict`).

Format (version 1), documented here and in the README; no pickle, nothing executed on load::

    MODELS_DIR/
      index.json                 {"format": "adlab-models", "format_version": 1, "engine_version", "methods": [...]}
      <method>/
        model.json               the model card, below
        params.json              the detector's parameters, image size and JSON-able learned values (Detector.save)
        state.safetensors        the detector's learned tensors (Detector.save)

model.json::

    {"format": "adlab-model", "format_version": 1, "engine_version": "0.5.0",
     "method", "family", "localises", "image_size": S, "backbone", "weights", "params": {...},
     "thresholds": {"f1": t | null, "fpr": {"0.01": t, "0.05": t, "0.1": t}},
     "good_scores": [...],          scores of the run's good test images: any "fpr:N" threshold is computed from them
     "map_range": [lo, hi] | null,   colour range of the heatmaps (the run's maps, as the dashboard colours them)
     "dataset": {"name", "digest", "n_train", "n_test"}, "metrics": {...}, "run": {"preset", "seed", "cache_key"}}

A model is only used by the engine version that wrote it (scores can change between versions); another version
is refused with what to do. Images are loaded exactly as the run loaded its test images (same loader, same size),
so a saved model gives an image the score the run gave it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import registry
from engine.api import ConfigError, DataValidationError, ImageSet, Prediction
from engine.backbones import weights_description
from engine.cache import ENGINE_VERSION, Cache, default_cache
from engine.components.features import using_cache
from engine.data.archive import extract_zip
from engine.data.limits import cache_root
from engine.heatmap import map_range
from engine.metrics import threshold_at_fpr

FORMAT = "adlab-model"
INDEX_FORMAT = "adlab-models"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
INDEX_FILE = "index.json"
DETECTOR_FILES = ("params.json", "state.safetensors")
FPR_LEVELS = (0.01, 0.05, 0.1)


@dataclass
class SavedModel:
    """A loaded model: its folder, its card (model.json) and the fitted detector."""

    directory: Path
    card: dict[str, Any]
    detector: Any

    @property
    def method(self) -> str:
        return str(self.card["method"])

    @property
    def image_size(self) -> int:
        """Side S of the square working resolution the run used (images are resized to S x S); the short side
        of `image_shape` for a keep-aspect run."""
        return int(self.card["image_size"])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) images are resized to before scoring (cards written before issue 17: S x S)."""
        shape = self.card.get("image_shape") or [self.image_size, self.image_size]
        return int(shape[0]), int(shape[1])

    @property
    def map_range(self) -> tuple[float, float] | None:
        r = self.card.get("map_range")
        return (float(r[0]), float(r[1])) if r else None

    def threshold(self, rule: str) -> tuple[float, str]:
        """(threshold, how it was chosen) for a rule "f1", "fpr:0.01" or a number; see resolve_threshold."""
        return resolve_threshold(self.card, rule)

    def predict(self, images: ImageSet) -> Prediction:
        """Scores (N,) and maps (N, H, W) or None for images at the model's shape. Features of these images are
        not written to the disk cache (they are new images, seen once)."""
        if images.size != self.image_shape:
            h, w = self.image_shape
            raise ConfigError(f"images are {images.size[0]}x{images.size[1]} px (HxW), this model works at "
                              f"{h}x{w}: load them with load_files(..., image_shape)")
        with using_cache(Cache(enabled=False)):
            return self.detector.predict(images)


# ----------------------------------------------------------------------------------------------------- writing


def model_card(record: dict[str, Any], detector_meta: dict[str, Any], maps: torch.Tensor | np.ndarray | None,
               dataset: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The model.json of a finished run record (DESIGN §7 run) with its detector's params.json and the run's test
    maps (N, S, S) as the cache stores them (float16), which set the heatmaps' colour range."""
    good = [float(i["score"]) for i in record.get("images", []) if int(i["label"]) == 0]
    metrics = record.get("metrics") or {}
    fpr = {f"{lvl:g}": threshold_at_fpr(np.asarray(good), lvl) for lvl in FPR_LEVELS} if good else {}
    params = detector_meta.get("params", {})
    size = detector_meta.get("image_size") or [config.get("image_size")] * 2
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": ENGINE_VERSION,
        "method": record["method"], "family": record.get("family"), "localises": bool(record.get("localises", True)),
        "image_size": int(min(size)), "image_shape": [int(size[0]), int(size[1])],
        "tile": (detector_meta.get("tiling") or {}).get("tile"),
        "backbone": params.get("backbone"), "weights": record.get("weights"),
        "params": params,
        "thresholds": {"f1": metrics.get("threshold"), "fpr": fpr},
        "good_scores": good,
        "map_range": list(map_range(np.asarray(maps, dtype=np.float32))) if maps is not None else None,
        "dataset": {k: dataset.get(k) for k in ("name", "digest", "n_train", "n_test")},
        "metrics": {k: v for k, v in metrics.items() if k != "per_defect"},
        "run": {"preset": config.get("preset"), "seed": config.get("seed"), "cache_key": record.get("cache_key")},
    }


def write_model(out_dir: str | Path, record: dict[str, Any], *, maps: torch.Tensor | np.ndarray | None,
                dataset: dict[str, Any], config: dict[str, Any], detector: Any = None,
                source: str | Path | None = None) -> Path:
    """Write the model of a finished run ``record`` to ``out_dir/<method>/`` (an older one is replaced atomically)
    and list it in ``out_dir/index.json``. Returns the model's folder.

    The learned state comes from the fitted ``detector`` or from ``source``, a folder holding its params.json and
    state.safetensors (the model kept in the cache). maps: the run's test maps (N, S, S) or None; dataset and
    config: the results' "dataset" and "config" entries.
    """
    if (detector is None) == (source is None):
        raise ValueError("give exactly one of detector or source")
    method = record["method"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / method
    tmp = out / f".{method}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if detector is not None:
            detector.save(tmp)
        else:
            for name in DETECTOR_FILES:
                shutil.copyfile(Path(source) / name, tmp / name)  # type: ignore[arg-type]
        meta = json.loads((tmp / "params.json").read_text())
        card = model_card(record, meta, maps, dataset, config)
        (tmp / MODEL_FILE).write_text(json.dumps(card, indent=1))
        old = out / f".{method}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _add_to_index(out, method)
    return final


def cached_model_dir(record: dict[str, Any], cache: Cache | None = None) -> Path | None:
    """The cache folder holding the fitted model of a run record (kept when the run had keep_models), or None."""
    cache = cache or default_cache()
    key = record.get("cache_key")
    if not key or not cache.has("models", key):
        return None
    d = cache.entry_dir("models", key)
    return d if all((d / f).is_file() for f in DETECTOR_FILES) else None


def _add_to_index(out: Path, method: str) -> None:
    idx = out / INDEX_FILE
    try:
        methods = list(json.loads(idx.read_text()).get("methods", []))
    except (OSError, ValueError, AttributeError):
        methods = []
    if method not in methods:
        methods.append(method)
    tmp = out / f".{INDEX_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"format": INDEX_FORMAT, "format_version": FORMAT_VERSION,
                               "engine_version": ENGINE_VERSION, "methods": methods}, indent=1))
    os.replace(tmp, idx)


# ----------------------------------------------------------------------------------------------------- reading


def saved_methods(models_dir: str | Path) -> list[str]:
    """Names of the models in a models folder (a folder holding one model directly counts as that one)."""
    d = Path(models_dir)
    if (d / MODEL_FILE).is_file():
        return [str(_read_card(d).get("method"))]
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and (p / MODEL_FILE).is_file())


def _read_card(d: Path) -> dict[str, Any]:
    try:
        card = json.loads((d / MODEL_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{d / MODEL_FILE}: cannot read the model card ({e}); save the model again") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise ConfigError(f"{d / MODEL_FILE} is not an adlab model card; give the folder written by "
                          "`adlab run ... --save-models DIR`")
    return card


def model_dir(models_dir: str | Path, method: str | None) -> Path:
    """The folder of one model inside ``models_dir`` (or ``models_dir`` itself when it holds one model)."""
    d = Path(models_dir).expanduser()
    if not d.exists():
        raise ConfigError(f"{d}: no such folder; give the folder written by `adlab run ... --save-models DIR`")
    if d.is_file():
        d = _unpacked(d)
    if (d / MODEL_FILE).is_file():
        found = str(_read_card(d).get("method"))
        if method is not None and method != found:
            raise ConfigError(f"{d} holds a {found!r} model, not {method!r}")
        return d
    names = saved_methods(d)
    if not names:
        raise ConfigError(f"{d} holds no saved model; write one with `adlab run DATA --methods M --save-models {d}`")
    if method is None:
        if len(names) > 1:
            raise ConfigError(f"{d} holds {len(names)} models ({', '.join(names)}): choose one with --method")
        method = names[0]
    if method not in names:
        raise ConfigError(f"{d} has no model {method!r}; it has {', '.join(names)}")
    return d / method


def _unpacked(archive: Path) -> Path:
    """A zipped models folder (the dashboard's "Download model") extracted safely under the cache, reused."""
    if not zipfile.is_zipfile(archive):
        raise ConfigError(f"{archive} is a file, not a models folder or a .zip of one")
    with open(archive, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256").hexdigest()[:32]
    dest = cache_root() / "uploads" / "models" / sha
    if not dest.is_dir():
        try:
            extract_zip(archive, dest)
        except FileExistsError:
            pass
        except DataValidationError as e:
            raise ConfigError(f"{archive} cannot be unpacked: {e}") from None
    return dest


def load_model(models_dir: str | Path, method: str | None = None, device: str = "auto") -> SavedModel:
    """Load a saved model (ConfigError with what to do when it is missing, damaged or from another version)."""
    d = model_dir(models_dir, method)
    card = _read_card(d)
    version = int(card.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ConfigError(f"{d} uses model format {version}; this adlab reads format {FORMAT_VERSION} and older: "
                          "upgrade adlab to use it")
    written_by = card.get("engine_version")
    if written_by != ENGINE_VERSION:
        raise ConfigError(
            f"{d} was saved by adlab engine {written_by}; this is engine {ENGINE_VERSION}. A model is only used by "
            "the version that trained it (its scores and thresholds could differ here): train it again with this "
            f"version (`adlab run DATA --methods {card.get('method')} --save-models DIR`), or install adlab "
            f"{written_by} to use this one")
    name = str(card.get("method"))
    try:
        info = registry.info(name)
    except ConfigError:
        raise ConfigError(f"{d} holds a model of method {name!r}, which this adlab does not have") from None
    params = card.get("params") or {}
    if info.uses_backbone and params.get("backbone"):
        here = weights_description(params["backbone"], params.get("weights", "auto"))
        if card.get("weights") and here != card["weights"]:
            raise ConfigError(f"{d} was trained on backbone weights {card['weights']!r}, but here they would come "
                              f"from {here!r}; make the same weights available (e.g. the same --weights file)")
    return SavedModel(directory=d, card=card, detector=_detector(d, name, device))


def cached_model(record: dict[str, Any], results: dict[str, Any], *, maps: torch.Tensor | np.ndarray | None = None,
                 cache: Cache | None = None, device: str = "auto") -> SavedModel | None:
    """The model a run kept in the cache (RunConfig.keep_models), with its card built from the run record;
    None when the cache does not hold it. results: the run's results (its "dataset" and "config" entries)."""
    d = cached_model_dir(record, cache)
    if d is None:
        return None
    try:
        meta = json.loads((d / "params.json").read_text())
    except (OSError, ValueError):
        return None
    card = model_card(record, meta, maps, results.get("dataset") or {}, results.get("config") or {})
    return SavedModel(directory=d, card=card, detector=_detector(d, record["method"], device))


def _detector(d: Path, name: str, device: str) -> Any:
    """The fitted detector stored in ``d`` (params.json + state.safetensors)."""
    missing = [f for f in DETECTOR_FILES if not (d / f).is_file()]
    if missing:
        raise ConfigError(f"{d} is incomplete (missing {', '.join(missing)}); save the model again")
    det = registry.create(name).to(device)
    try:
        det.load(d)
    except ConfigError:
        raise
    except Exception as e:  # corrupt safetensors, wrong shapes: a damaged or edited model
        raise ConfigError(f"{d}: the model files are damaged ({type(e).__name__}: {e}); save the model again") from None
    return det


# -------------------------------------------------------------------------------------------------- thresholds


def resolve_threshold(card: dict[str, Any], rule: str | float) -> tuple[float, str]:
    """(threshold, description) from a rule: "f1" (the run's F1-max threshold), "fpr:N" (flag at most a share
    N in [0, 1] of the run's good test images) or a number. An image is flagged when score >= threshold."""
    text = str(rule).strip().lower()
    method = card.get("method")
    if text == "f1":
        t = (card.get("thresholds") or {}).get("f1")
        if t is None:
            raise ConfigError(f"{method} has no F1 threshold (its run had no anomalous test images): "
                              "use --threshold fpr:0.01 or a number")
        return float(t), "f1 (F1-max on the run's test images)"
    if text.startswith("fpr:"):
        try:
            share = float(text[4:])
        except ValueError:
            share = math.nan
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"--threshold {rule!r}: fpr:N needs a share N between 0 and 1, e.g. fpr:0.01 "
                              "(at most 1% of good images flagged)")
        good = card.get("good_scores") or []
        if not good:
            raise ConfigError(f"{method} has no good test images in its run to set fpr:N on; use a number")
        return threshold_at_fpr(np.asarray(good, dtype=np.float64), share), \
            f"fpr:{share:g} (at most {share:.1%} of the run's good images flagged)"
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--threshold {rule!r}: use f1, fpr:N (e.g. fpr:0.01) or a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"--threshold {rule!r}: the threshold must be a finite number")
    return value, "value given"
