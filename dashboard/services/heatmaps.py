"""Heatmaps: each method's stored anomaly maps and the panels the Heatmaps page draws."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from dashboard.services.analysis import thresholds
from dashboard.services.common import UserError, _user_error
from dashboard.services.data import _dataset
from dashboard.services.results import ok_runs, run_name
from engine.heatmap import DEFAULT_OPACITY  # noqa: F401 - the pages' default map opacity, as adlab predict draws
from engine.runner import load_images, load_prediction

_maps_lock = threading.Lock()
_maps_memo: dict[str, np.ndarray] = {}


def _maps(cache_key: str) -> np.ndarray | None:
    """Stored maps of a run (memoised, read-only); None when the engine cache no longer has them."""
    with _maps_lock:
        if cache_key in _maps_memo:
            return _maps_memo[cache_key]
    pred = load_prediction({"cache_key": cache_key})
    if pred is None or pred.maps is None:
        return None
    arr = pred.maps.float().numpy()
    arr.setflags(write=False)
    with _maps_lock:
        if len(_maps_memo) >= 24:
            _maps_memo.pop(next(iter(_maps_memo)))
        _maps_memo[cache_key] = arr
    return arr


def method_maps(run: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """(maps (N, H, W) in the run's image order, or None; a note). Notes say why there is no map."""
    if not run.get("localises", True):
        return None, "no pixel map: this method gives an image score only"
    try:
        maps = _maps(str(run.get("cache_key"))) if run.get("cache_key") else None
    except Exception as e:  # noqa: BLE001
        return None, f"could not read its stored maps: {_user_error(e)}"
    if maps is None:
        return None, "maps not in the cache any more: run it again on Train (takes seconds)"
    return maps, ""


def test_image(results: dict[str, Any], path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(image (H,W,3) uint8, mask (H,W) or None) of one test image at the run's working shape (square S x S for
    results written before keep-aspect existed)."""
    from dashboard.views.images import to_rgb_uint8

    src = results["dataset"].get("source") or results["dataset"]["path"]
    ds = _dataset(src)
    c = results["config"]
    try:
        shape = c.get("image_shape") or ds.working_shape(int(c["image_size"]), c.get("resize", "square"),
                                                         c.get("tile"))
        test = load_images(ds, "test", tuple(shape))
    except Exception as e:  # noqa: BLE001
        raise _user_error(e) from None
    if path not in test.paths:
        raise UserError(f"{path} is not in this dataset's test images any more")
    row = test.paths.index(path)
    mask = test.masks[row].numpy() if test.masks is not None and bool(test.has_mask[row]) else None
    return to_rgb_uint8(test.images[row].numpy()), mask


def heatmap_panels(results: dict[str, Any], path: str, *, colour: str = "per_method", opacity: float = 0.5,
                   thr: dict[str, float | None] | None = None, family: str | None = None) -> dict[str, Any]:
    """Everything the Heatmaps page draws for one image: the image, its mask overlay, one panel per method
    (overlay or None with a note, score, threshold, verdict, correct), and a colour bar."""
    from dashboard.views import images as vi

    image, mask = test_image(results, path)
    thr = thr if thr is not None else thresholds(results)
    runs = [r for r in ok_runs(results) if family is None or r.get("family") == family]
    maps: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}
    for r in runs:
        m, note = method_maps(r)
        if m is not None:
            maps[run_name(r)] = m
        notes[run_name(r)] = note
    ranges = vi.colour_ranges(maps, colour) if maps else {}
    label = None
    panels = []
    for r in runs:
        paths = [i["path"] for i in r["images"]]
        if path not in paths:
            continue
        row = paths.index(path)
        item = r["images"][row]
        label = item["label"]
        t = thr.get(run_name(r))
        flagged = None if t is None else bool(item["score"] >= t)
        overlay = None
        if run_name(r) in maps:
            lo, hi = ranges[run_name(r)]
            overlay = vi.heat_overlay(image, maps[run_name(r)][row], lo, hi, opacity)
        panels.append({"method": run_name(r), "family": r.get("family"), "overlay": overlay,
                       "note": notes[run_name(r)], "score": item["score"], "threshold": t, "flagged": flagged,
                       "correct": None if flagged is None else flagged == bool(item["label"])})
    return {"image": image, "mask_overlay": vi.overlay_mask(image, mask) if mask is not None else None,
            "has_mask": mask is not None, "label": label, "panels": panels, "colour_bar": vi.colour_bar()}
