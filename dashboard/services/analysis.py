"""Analysis for Compare, Failures and Learn: metrics table with intervals, curves, per-defect table, speed,
thresholds, confusion tables, failure cases and disagreements; one family's rows and CSV bytes."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dashboard.services.results import ok_runs, run_name, run_notes_text
from engine import metrics as em
from engine import registry


@functools.lru_cache(maxsize=256)
def _ci(key: str, scores: tuple[float, ...], labels: tuple[int, ...]) -> tuple[float, float] | None:
    return em.bootstrap_ci(np.asarray(scores), np.asarray(labels), "image_auroc", n_boot=500, seed=0)


def auroc_ci(run: dict[str, Any]) -> tuple[float, float] | None:
    """95% bootstrap interval of a run's image AUROC (over its per-image scores)."""
    imgs = run.get("images") or []
    if not imgs:
        return None
    return _ci(str(run.get("cache_key")), tuple(float(i["score"]) for i in imgs), tuple(int(i["label"]) for i in imgs))


def metrics_table(results: dict[str, Any] | None) -> pd.DataFrame:
    """One row per method: every metric, its AUROC interval, timings, status and error."""
    rows = []
    for r in (results or {}).get("runs", []):
        m = r.get("metrics") or {}
        t = r.get("timing") or {}
        ci = auroc_ci(r) if r.get("status") == "ok" else None
        rows.append({
            "method": run_name(r), "family": registry.FAMILIES.get(r.get("family", ""), r.get("family")),
            "status": r["status"] + (" (cached)" if r.get("cached") else ""),
            "image AUROC": m.get("image_auroc"),
            "AUROC 95% CI": f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else None,
            "image AP": m.get("image_ap"), "F1-max": m.get("image_f1_max"),
            "pixel AUROC": m.get("pixel_auroc"), "AUPRO": m.get("pixel_aupro"),
            "fit s": t.get("fit_s"), "predict s": t.get("predict_s"), "images/s": t.get("images_per_s"),
            "peak MB": t.get("peak_mem_mb"), "trained in": r.get("train_precision"),
            "faithful": r.get("faithful", True),
            "reduced": bool(r.get("reduced", False)), "weights": r.get("weights"),
            "notes": run_notes_text(r) or None, "error": r.get("error"),
        })
    return pd.DataFrame(rows)


def curves(results: dict[str, Any] | None, kind: str) -> list[tuple[str, list[float], list[float], float | None]]:
    """(method, x, y, area) per ok run. kind: "roc" (fpr, tpr, image AUROC), "pr" (recall, precision, AP),
    "pixel_roc" (fpr, tpr, pixel AUROC; methods without one are left out)."""
    out = []
    for r in ok_runs(results):
        c = (r.get("curves") or {}).get(kind)
        if not c:
            continue
        m = r.get("metrics") or {}
        if kind == "pr":
            out.append((run_name(r), c["recall"], c["precision"], m.get("image_ap")))
        else:
            area = m.get("pixel_auroc" if kind == "pixel_roc" else "image_auroc")
            out.append((run_name(r), c["fpr"], c["tpr"], area))
    return out


def base_rate(results: dict[str, Any] | None) -> float | None:
    """Share of defective images in the evaluated test set."""
    runs = ok_runs(results)
    if not runs or not runs[0].get("images"):
        return None
    labels = [i["label"] for i in runs[0]["images"]]
    return sum(labels) / len(labels)


def per_defect(results: dict[str, Any] | None) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(methods, defect types, AUROC matrix) over ok runs."""
    runs = ok_runs(results)
    types = sorted({t for r in runs for t in ((r.get("metrics") or {}).get("per_defect") or {})})
    vals = [[(((r["metrics"].get("per_defect") or {}).get(t)) or {}).get("image_auroc") for t in types] for r in runs]
    return [run_name(r) for r in runs], types, vals


def speed_points(results: dict[str, Any] | None) -> tuple[list[str], list[float], list[float]]:
    """(methods, images per second, image AUROC) for ok runs that have both."""
    ms, xs, ys = [], [], []
    for r in ok_runs(results):
        s = (r.get("timing") or {}).get("images_per_s")
        a = (r.get("metrics") or {}).get("image_auroc")
        if s is not None and a is not None:
            ms.append(run_name(r))
            xs.append(float(s))
            ys.append(float(a))
    return ms, xs, ys


def best_method(results: dict[str, Any] | None) -> str | None:
    """The ok run with the highest image AUROC (ties: the faster one)."""
    runs = [r for r in ok_runs(results) if (r.get("metrics") or {}).get("image_auroc") is not None]
    if not runs:
        return None
    return max(runs, key=lambda r: (r["metrics"]["image_auroc"], (r.get("timing") or {}).get("images_per_s") or 0))[
        "method"]


def _run_of(results: dict[str, Any] | None, method: str) -> dict[str, Any] | None:
    return next((r for r in ok_runs(results) if run_name(r) == method), None)




def thresholds(results: dict[str, Any] | None, mode: str = "f1", max_fpr: float = 0.05) -> dict[str, float | None]:
    """Decision threshold per ok method. mode "f1": the F1-max threshold from the metrics; "fpr": the lowest
    threshold flagging at most `max_fpr` of the good test images."""
    out: dict[str, float | None] = {}
    for r in ok_runs(results):
        if mode == "f1":
            out[run_name(r)] = (r.get("metrics") or {}).get("threshold")
        else:
            good = [i["score"] for i in r.get("images", []) if i["label"] == 0]
            out[run_name(r)] = em.threshold_at_fpr(np.asarray(good), max_fpr) if good else None
    return out


def confusion_table(results: dict[str, Any] | None, thr: dict[str, float | None]) -> pd.DataFrame:
    """Per method at its threshold: caught defects, missed defects, false alarms, and the rates."""
    rows = []
    for r in ok_runs(results):
        t = thr.get(run_name(r))
        if t is None:
            continue
        s = np.asarray([i["score"] for i in r["images"]])
        y = np.asarray([i["label"] for i in r["images"]])
        c = em.confusion_at(s, y, t)
        rows.append({"method": run_name(r), "threshold": t, "defects caught": c["tp"], "missed (FN)": c["fn"],
                     "false alarms (FP)": c["fp"], "good passed": c["tn"], "recall": c["tpr"], "FPR": c["fpr"]})
    return pd.DataFrame(rows)


def failures(results: dict[str, Any] | None, method: str, threshold: float | None
             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(false positives, false negatives) of a method at `threshold`, the most confident mistakes first.

    Each item: path, name, defect_type, label, score, margin (distance from the threshold, always >= 0).
    """
    r = _run_of(results, method)
    if r is None or threshold is None:
        return [], []
    fps, fns = [], []
    for i in r["images"]:
        flagged = i["score"] >= threshold
        item = {**i, "name": _short(i["path"]), "margin": abs(i["score"] - threshold)}
        if flagged and i["label"] == 0:
            fps.append(item)
        elif not flagged and i["label"] == 1:
            fns.append(item)
    return sorted(fps, key=lambda d: -d["margin"]), sorted(fns, key=lambda d: -d["margin"])


def disagreements(results: dict[str, Any] | None, thr: dict[str, float | None], top: int = 8) -> list[dict[str, Any]]:
    """Images where the methods' verdicts split most evenly (ties broken by how far apart their normalised
    scores are). Each item: path, name, defect_type, label, verdicts {method: bool flagged}, n_wrong."""
    runs = [r for r in ok_runs(results) if thr.get(run_name(r)) is not None]
    if len(runs) < 2:
        return []
    per_path: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = np.asarray([i["score"] for i in r["images"]])
        spread = float(np.std(s)) or 1.0
        t = thr[run_name(r)]
        for i in r["images"]:
            d = per_path.setdefault(i["path"], {"path": i["path"], "name": _short(i["path"]), "label": i["label"],
                                                "defect_type": i["defect_type"], "verdicts": {}, "z": []})
            d["verdicts"][run_name(r)] = bool(i["score"] >= t)
            d["z"].append((i["score"] - t) / spread)
    items = []
    for d in per_path.values():
        if len(d["verdicts"]) != len(runs):
            continue
        n_flag = sum(d["verdicts"].values())
        split = min(n_flag, len(runs) - n_flag)
        if split == 0:
            continue
        d["n_wrong"] = sum(v != bool(d["label"]) for v in d["verdicts"].values())
        d["spread"] = float(np.ptp(d.pop("z")))
        items.append((split, d["spread"], d))
    items.sort(key=lambda x: (-x[0], -x[1]))
    return [d for _, _, d in items[:top]]


def _short(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def test_images(results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The evaluated test images (path, name, label, defect_type), defects first."""
    runs = ok_runs(results)
    if not runs:
        return []
    imgs = [{**i, "name": _short(i["path"])} for i in runs[0]["images"]]
    return sorted(imgs, key=lambda i: (i["label"] == 0, i["defect_type"], i["name"]))


def family_results(results: dict[str, Any] | None, family: str) -> pd.DataFrame:
    """The metrics rows of one family's methods in the current results (empty when none ran)."""
    df = metrics_table(results)
    if df.empty:
        return df
    title = registry.FAMILIES.get(family, family)
    cols = ["method", "status", "image AUROC", "pixel AUROC", "AUPRO", "images/s"]
    return df[df["family"] == title][cols].reset_index(drop=True)


def csv_bytes(df: pd.DataFrame) -> bytes:
    """A frame as CSV."""
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode()
