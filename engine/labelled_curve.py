"""The labelled-anomaly curve: "is labelling worth it?" from a run with several K (`--labeled-anomalies 0,1,3,10`).

For every weakly supervised method, its image AUROC (with a bootstrap interval over the test images), pixel AUROC
and best-threshold F1 at each K; beside them the best unsupervised method of the same run as a flat reference.
Every run of such a results dict is evaluated on the same test images (runner.labeled_rows_by_k), so the points
are comparable. The dashboard only plots what `labelled_curve` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from engine import registry
from engine.metrics import bootstrap_ci

CURVE_KS = (0, 1, 3, 10)  # the K the dashboard's "Is labelling worth it?" asks for, before capping
_VALUES = ("image_auroc", "pixel_auroc", "image_f1_max")


def run_ks(results: Mapping[str, Any] | None) -> list[int]:
    """The distinct K of the weakly supervised runs in a results dict, sorted (one entry for a single-K run)."""
    return sorted({int(r["labeled_k"]) for r in (results or {}).get("runs", []) if r.get("labeled_k") is not None})


def has_curve(results: Mapping[str, Any] | None) -> bool:
    """True when the results hold weakly supervised runs at two or more K."""
    return len(run_ks(results)) > 1


def _interval(run: Mapping[str, Any], n_boot: int, seed: int) -> tuple[float, float] | None:
    """95% percentile bootstrap interval of the run's image AUROC over its per-image scores, or None."""
    imgs = run.get("images") or []
    if not imgs:
        return None
    scores = np.asarray([float(i["score"]) for i in imgs])
    labels = np.asarray([int(i["label"]) for i in imgs])
    return bootstrap_ci(scores, labels, "image_auroc", n_boot=n_boot, seed=seed)


def _supervision(run: Mapping[str, Any]) -> str | None:
    try:
        return registry.info(run["method"]).supervision
    except Exception:  # noqa: BLE001 - a method no longer registered: it cannot be placed on either side
        return None


def labelled_curve(results: Mapping[str, Any] | None, *, n_boot: int = 500, seed: int = 0) -> dict[str, Any] | None:
    """The curve data of a results dict with several K, or None when it has fewer than two K.

    Returns:
        ``{"ks": [K...], "n_test": int | None,
        "weak": {method: [{"k", "status", "error", "image_auroc", "image_auroc_ci": [lo, hi] | None,
        "pixel_auroc", "image_f1_max"} per K (rising)]},
        "reference": {"image_auroc": ref | None, "pixel_auroc": ref | None}}`` where ``ref`` is
        ``{"method", "value", "ci": [lo, hi] | None}``: the unsupervised run with the best value of that metric
        (pixel AUROC has no interval: the bootstrap resamples image scores only). Values that do not apply
        (a failed run, no masks, no maps) are None. ``has_pixel`` says whether any point has a pixel AUROC.
    """
    if not has_curve(results):
        return None
    assert results is not None
    runs = list(results.get("runs", []))
    weak: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r.get("labeled_k") is None:
            continue
        m = r.get("metrics") or {}
        ok = r.get("status") == "ok"
        ci = _interval(r, n_boot, seed) if ok else None
        point = {"k": int(r["labeled_k"]), "status": r.get("status"), "error": r.get("error"),
                 **{v: (m.get(v) if ok else None) for v in _VALUES},
                 "image_auroc_ci": None if ci is None else [ci[0], ci[1]]}
        weak.setdefault(r["method"], []).append(point)
    for points in weak.values():
        points.sort(key=lambda p: p["k"])
    unsup = [r for r in runs if r.get("status") == "ok" and r.get("labeled_k") is None
             and _supervision(r) not in (None, "weak")]
    reference: dict[str, Any] = {}
    for metric in ("image_auroc", "pixel_auroc"):
        scored = [r for r in unsup if (r.get("metrics") or {}).get(metric) is not None]
        if not scored:
            reference[metric] = None
            continue
        best = max(scored, key=lambda r: r["metrics"][metric])
        ci = _interval(best, n_boot, seed) if metric == "image_auroc" else None
        reference[metric] = {"method": best["method"], "value": float(best["metrics"][metric]),
                             "ci": None if ci is None else [ci[0], ci[1]]}
    has_pixel = any(p["pixel_auroc"] is not None for ps in weak.values() for p in ps) or (
        reference["pixel_auroc"] is not None)
    return {"ks": run_ks(results), "n_test": (results.get("dataset") or {}).get("n_test"), "weak": weak,
            "reference": reference, "has_pixel": has_pixel}


def capped_ks(anomalies_per_type: Mapping[str, int], wanted: Iterable[int] = CURVE_KS) -> tuple[list[int], str | None]:
    """The K of `wanted` a dataset can give, and a note when it caps them (None when it does not).

    K stops at half the anomalous test images of the largest defect type, so that type keeps at least as many
    images for evaluation as it gives for training (the runner itself only keeps one of each type back, which
    would leave an AUROC on a handful of defects); larger K are replaced by that one. A type with fewer images
    gives min(K, n - 1) (the note names it). With no type of two or more anomalous images the list is [0].
    """
    wanted = sorted(set(wanted))
    top = max((n // 2 for n in anomalies_per_type.values()), default=0)
    if top < 1:
        return [0], ("no defect type has two or more anomalous test images: none can be moved into training while "
                     "one stays for evaluation, so there is no curve to draw on this dataset")
    ks = sorted({min(k, top) for k in wanted})
    note = None
    if top < max(wanted):
        note = (f"the largest defect type has {max(anomalies_per_type.values())} anomalous test "
                f"images, so K stops at {top} to keep at least as many for evaluation as for training (asked: "
                f"{', '.join(map(str, wanted))})")
    small = sorted(t for t, n in anomalies_per_type.items() if 0 < n // 2 < max(ks))
    if small:
        extra = (f"{', '.join(small)} have fewer than {2 * max(ks)} defective images: at K = {max(ks)} they keep "
                 "fewer for evaluation than they give for training (at least one stays)")
        note = f"{note}; {extra}" if note else extra
    return ks, note
