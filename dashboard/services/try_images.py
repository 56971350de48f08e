"""The Try page's services: score new images with every method trained on the current dataset, and give a method's
saved model as a download. Like `dashboard.services`, pages call these with plain values and get plain values back;
engine errors become `UserError` / `DataProblems`.

The models are the ones the runs kept in the engine cache (the dashboard trains with RunConfig.keep_models), loaded
with engine.saved_models, and images are scored by engine.predict: the same code as `adlab predict`, so a dropped
image gets the score `adlab predict` would give it, and the run's score when it is one of the run's test images.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dashboard.services.common import MAX_UPLOAD_MB, UPLOAD_LIMITS, DataProblems, UserError, _user_error
from dashboard.services.heatmaps import method_maps
from dashboard.services.results import ok_runs, run_name
from engine import saved_models
from engine.data.inputs import InputImage, collect_images
from engine.heatmap import DEFAULT_OPACITY
from engine.predict import Scored, heatmap_image, score_files

IMAGE_TYPES = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "zip"]
SHOWN_IMAGES = 12  # images drawn with their heatmaps; the verdict table lists every image
NO_MODEL = "its fitted model was not kept (trained before models were stored): train it again on Train to try it"

_lock = threading.Lock()
_models: dict[str, saved_models.SavedModel] = {}
_scores: dict[tuple[str, tuple[str, ...]], list[Scored]] = {}


def _model(run: dict[str, Any], results: dict[str, Any]) -> saved_models.SavedModel | None:
    """The run's kept model (memoised by its cache key), with the run's colour range; None when not kept."""
    key = str(run.get("cache_key"))
    with _lock:
        if key in _models:
            return _models[key]
    maps, _ = method_maps(run)
    try:
        model = saved_models.cached_model(run, results, maps=maps)
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    if model is not None:
        with _lock:
            if len(_models) >= 4:  # a PaDiM model at 256 px holds ~0.5 GB of matrices
                _models.pop(next(iter(_models)))
            _models[key] = model
    return model


def save_images(files: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """Store dropped files (images or zips of images) under the cache and check every one like `adlab predict`
    does. Returns [{"path", "name"}] in order; raises DataProblems listing every bad file (by its own name)."""
    if not files:
        return []
    total = sum(len(b) for _, b in files)
    if total > MAX_UPLOAD_MB * 2**20:
        raise UserError(f"{total / 2**20:.0f} MB dropped, over the {MAX_UPLOAD_MB} MB upload limit: "
                        "score fewer images at a time")
    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    folder = UPLOAD_LIMITS.upload_dir() / "try" / h.hexdigest()[:32]
    folder.mkdir(parents=True, exist_ok=True)
    paths, names = [], {}
    for k, (name, data) in enumerate(files):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:100] or "image"
        target = folder / f"{k:03d}_{safe}"
        if not target.exists():
            target.write_bytes(data)
        paths.append(str(target))
        own = Path(name).name
        n_same = sum(v == own or v.startswith(own + " (") for v in names.values())
        names[str(target)] = own if n_same == 0 else f"{own} ({n_same + 1})"  # two dropped files named alike
    try:
        items = collect_images(paths, UPLOAD_LIMITS)
    except Exception as e:  # noqa: BLE001
        err = _user_error(e)
        if isinstance(err, DataProblems):  # show the user's file names, not where they were stored
            err = DataProblems([(_own_name(p, names), m, hint) for p, m, hint in err.problems])
        raise err from None
    return [{"path": i.path, "name": _own_name(i.name, names)} for i in items]


def _own_name(shown: str, names: dict[str, str]) -> str:
    for stored, own in names.items():
        if shown == stored or shown.startswith(stored + ":"):
            return own + shown[len(stored):]
        if shown.startswith(Path(stored).name + ":"):  # problems inside a zip are named by the zip's file name
            return own + shown[len(Path(stored).name):]
    return shown


def _scored(model: saved_models.SavedModel, images: list[dict[str, str]]) -> list[Scored]:
    key = (str(model.directory), tuple(i["path"] for i in images))
    with _lock:
        if key in _scores:
            return _scores[key]
    try:
        out = list(score_files(model, [InputImage(i["path"], i["name"]) for i in images]))
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    with _lock:
        if len(_scores) >= 8:
            _scores.pop(next(iter(_scores)))
        _scores[key] = out
    return out


def try_images(results: dict[str, Any] | None, images: list[dict[str, str]], thr: dict[str, float | None],
               opacity: float = DEFAULT_OPACITY) -> dict[str, Any]:
    """Score `images` (from save_images) with every trained method of `results`.

    Returns {"images": [{"name", "image" (S,S,3) uint8, "panels": [{"method", "overlay" (S,S,3) or None, "note",
    "score", "threshold", "flagged"}]}], "missing": {method: why it cannot score}, "table": rows of
    {"image", method: verdict text}}. Verdicts use `thr` (the Failures page's thresholds): flagged when
    score >= threshold.
    """
    out: dict[str, Any] = {"images": [], "missing": {}, "table": []}
    if not images or not results:
        return out
    per_method: dict[str, tuple[saved_models.SavedModel, list[Scored]]] = {}
    for run in ok_runs(results):
        model = _model(run, results)
        if model is None:
            out["missing"][run_name(run)] = NO_MODEL
            continue
        per_method[run_name(run)] = (model, _scored(model, images))
    for k, img in enumerate(images):
        panels, row = [], {"image": img["name"]}
        first: np.ndarray | None = None
        for method, (model, scored) in per_method.items():
            s = scored[k]
            first = s.image if first is None else first
            t = thr.get(method)
            flagged = None if t is None else bool(s.score >= t)
            overlay = heatmap_image(model, s, opacity) if k < SHOWN_IMAGES else None
            panels.append({"method": method, "overlay": overlay, "score": s.score, "threshold": t,
                           "flagged": flagged,
                           "note": "" if s.map is not None else "no pixel map: this method gives an image score only"})
            row[method] = "—" if flagged is None else ("ANOMALOUS" if flagged else "normal")
            row[f"{method} score"] = s.score
        out["table"].append(row)
        if k < SHOWN_IMAGES and first is not None:
            out["images"].append({"name": img["name"], "image": first, "panels": panels})
    return out


def has_model(results: dict[str, Any] | None, method: str) -> bool:
    """Whether the run of `method` kept its fitted model (so it can score images and be downloaded)."""
    run = next((r for r in ok_runs(results) if run_name(r) == method), None)
    return run is not None and saved_models.cached_model_dir(run) is not None


def model_zip(results: dict[str, Any], method: str) -> bytes:
    """The saved model of one method (engine.saved_models format, the layout of `adlab run --save-models`) as a
    zip: `adlab predict model.zip IMAGES... --out OUT` takes it as is."""
    run = next((r for r in ok_runs(results) if run_name(r) == method), None)
    source = saved_models.cached_model_dir(run) if run is not None else None
    if run is None or source is None:
        raise UserError(f"{method}: {NO_MODEL}")
    maps, _ = method_maps(run)
    buf = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="adlab-model-") as tmp:
        try:
            saved_models.write_model(tmp, run, maps=maps, dataset=results.get("dataset") or {},
                                     config=results.get("config") or {}, source=source)
        except Exception as e:  # noqa: BLE001
            raise _user_error(e) from None
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(tmp).as_posix())
    return buf.getvalue()
