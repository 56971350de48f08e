"""What the Benchmark page needs: load or run a sweep, and aggregate its units (DESIGN §10).

Plain values in, plain values out (dicts, pandas frames), like dashboard.services; engine errors become
`UserError`. A sweep's units are (dataset, method, seed) records (OUT/sweep.json, DESIGN §7).

Aggregation:
- mean ± std over seeds of a metric for each dataset × method;
- ranks: on each dataset and seed, methods are ranked by the metric (1 = best, ties share the mean rank);
  a method's average rank is the mean over datasets; doing that per seed gives a spread (min–max over seeds)
  that shows how much of the order is seed-to-seed noise;
- "within noise" groups: methods whose per-seed average-rank ranges overlap cannot be told apart by this sweep.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dashboard.services.common import SAMPLE_ROOT, UserError, _user_error
from dashboard.services.data import sample_categories
from engine import registry
from engine.api import AdlabError
from engine.data import cache_root
from engine.executors import LocalExecutor
from engine.sweep import SweepConfig, SweepProgress, load_sweep, run_sweep

METRICS = {"image_auroc": "image AUROC", "image_ap": "image AP", "image_f1_max": "F1-max",
           "pixel_auroc": "pixel AUROC", "pixel_aupro": "AUPRO"}
DEFAULT_METHODS = ["padim", "patchcore", "spade"]
_run_lock = threading.Lock()  # one page-started sweep at a time per server: they share the 2-core budget


def sweeps_root() -> Path:
    """Where sweeps started from the page are written: <cache root>/dashboard/sweeps/<id>/."""
    return cache_root() / "dashboard" / "sweeps"


def saved_sweeps() -> list[dict[str, Any]]:
    """Sweeps started from the page, newest first: {"id", "path", "label"}."""
    root = sweeps_root()
    out = []
    for f in sorted(root.glob("*/sweep.json"), key=lambda p: p.stat().st_mtime, reverse=True) if root.exists() else []:
        try:
            doc = load_sweep(f)
        except AdlabError:
            continue
        c = doc.get("config", {})
        label = (f"{', '.join(d['name'] for d in doc.get('datasets', []))} × {', '.join(c.get('methods', []))} × "
                 f"{len(c.get('seeds', []))} seed(s)" + ("" if doc.get("complete") else " (incomplete)"))
        out.append({"id": f.parent.name, "path": str(f.parent), "label": label})
    return out


def load(path_or_id: str) -> dict[str, Any]:
    """A page-started sweep by id (or its folder path under sweeps_root()); UserError when unreadable."""
    p = Path(path_or_id)
    p = p if p.is_absolute() else sweeps_root() / path_or_id
    if sweeps_root().resolve() not in p.resolve().parents:
        raise UserError("only sweeps started from this page can be opened by name; upload a sweep.json instead")
    try:
        doc = load_sweep(p)
    except AdlabError as e:
        raise _user_error(e) from None
    doc["_dir"] = str(p)
    return doc


def parse_upload(data: bytes) -> dict[str, Any]:
    """An uploaded sweep.json; UserError saying what is wrong with it."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"this file is not JSON: {e}") from None
    units = doc.get("units") if isinstance(doc, dict) else None
    if not isinstance(units, list):
        raise UserError("this JSON is not a sweep: it has no 'units' list (make one with `adlab sweep`)")
    need = {"dataset", "method", "seed", "status"}
    bad = [i for i, u in enumerate(units) if not isinstance(u, dict) or not need <= set(u)]
    if bad:
        raise UserError(f"{len(bad)} unit(s) lack dataset, method, seed or status (first: unit {bad[0]})")
    return doc


def run_sample_sweep(methods: list[str], seeds: list[int], *, image_size: int = 64, preset: str = "fast",
                     progress: Callable[[SweepProgress], None] | None = None) -> dict[str, Any]:
    """Run (or resume) a sweep over the bundled sample categories in this process; returns the loaded sweep."""
    cfg = SweepConfig(datasets=[str(SAMPLE_ROOT / c) for c in sample_categories()], methods=list(methods),
                      seeds=list(seeds), preset=preset, image_size=image_size)
    sid = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    if not _run_lock.acquire(blocking=False):
        raise UserError("another sweep is running on this server; try again when it has finished")
    try:
        run_sweep(cfg, sweeps_root() / sid, LocalExecutor(), progress=progress)
    except AdlabError as e:
        raise _user_error(e) from None
    finally:
        _run_lock.release()
    return load(sid)


# ------------------------------------------------------------------------------------------------- tables


def units_frame(doc: dict[str, Any]) -> pd.DataFrame:
    """One row per unit: dataset, method, family, seed, status, every metric, timing, error."""
    rows = []
    for u in doc.get("units", []):
        m = u.get("metrics") or {}
        t = u.get("timing") or {}
        # "method" names the run: "devnet · K=3" in a sweep over several K, so each K is its own column
        rows.append({"dataset": u["dataset"], "method": u.get("label") or u["method"],
                     "family": u.get("family") or _family(u["method"]),
                     "seed": u["seed"], "status": u["status"], **{k: m.get(k) for k in METRICS},
                     "fit_s": t.get("fit_s"), "predict_s": t.get("predict_s"), "images_per_s": t.get("images_per_s"),
                     "error": u.get("error")})
    cols = ["dataset", "method", "family", "seed", "status", *METRICS, "fit_s", "predict_s", "images_per_s", "error"]
    return pd.DataFrame(rows, columns=cols)


def _family(method: str) -> str | None:
    try:
        return registry.info(method).family
    except AdlabError:
        return None


def _ok(doc: dict[str, Any], metric: str) -> pd.DataFrame:
    df = units_frame(doc)
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}")
    return df[(df["status"] == "ok") & df[metric].notna()]


def summary(doc: dict[str, Any], metric: str = "image_auroc") -> pd.DataFrame:
    """Per dataset × method: mean, std (over seeds, 0 with one seed), n seeds ok, failed units, and "mean ± std"."""
    df = units_frame(doc)
    ok = _ok(doc, metric)
    g = ok.groupby(["dataset", "method"], sort=False)[metric]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0), "n": g.size()}).reset_index()
    failed = df[df["status"] != "ok"].groupby(["dataset", "method"]).size().rename("failed").reset_index()
    out = out.merge(failed, on=["dataset", "method"], how="outer").fillna({"n": 0, "failed": 0})
    out[["n", "failed"]] = out[["n", "failed"]].astype(int)
    families = dict(zip(df["method"], df["family"], strict=True))
    out["family"] = out["method"].map(families)
    out["mean ± std"] = [("—" if pd.isna(m) else f"{m:.3f} ± {s:.3f}") for m, s in zip(out["mean"], out["std"],
                                                                                      strict=True)]
    return out[["dataset", "method", "family", "mean", "std", "n", "failed", "mean ± std"]]


def table(doc: dict[str, Any], metric: str = "image_auroc") -> pd.DataFrame:
    """The "mean ± std" strings as a datasets × methods table (methods in the sweep's order)."""
    s = summary(doc, metric)
    methods = list(dict.fromkeys(units_frame(doc)["method"]))
    t = s.pivot(index="dataset", columns="method", values="mean ± std")
    return t.reindex(columns=[m for m in methods if m in t.columns]).fillna("failed").reset_index()


def _rank_rows(ok: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rank of each method on each (dataset, seed): 1 = best, ties share their mean rank."""
    r = ok.copy()
    r["rank"] = r.groupby(["dataset", "seed"])[metric].rank(ascending=False, method="average")
    return r


def ranks(doc: dict[str, Any], metric: str = "image_auroc") -> pd.DataFrame:
    """Per method, best first: average rank over datasets (of the seed means), the per-seed average ranks' mean,
    min and max, the number of datasets it ran on, and its "noise group" (methods sharing a group id overlap).

    Only datasets on which every method has a value are ranked, so a failed method cannot look better by
    being left out."""
    ok = _ok(doc, metric)
    methods = list(dict.fromkeys(ok["method"]))
    if not methods:
        return pd.DataFrame(columns=["method", "family", "avg_rank", "seed_mean", "seed_min", "seed_max",
                                     "datasets", "group"])
    full = [d for d, g in ok.groupby("dataset") if set(g["method"]) == set(methods)]
    ok = ok[ok["dataset"].isin(full)]
    means = ok.groupby(["dataset", "method"])[metric].mean().reset_index()
    means["rank"] = means.groupby("dataset")[metric].rank(ascending=False, method="average")
    avg = means.groupby("method")["rank"].mean()
    # per seed: only seeds where each of those datasets has every method
    per = _rank_rows(ok, metric)
    counts = per.groupby("seed").size()
    seeds = [s for s, n in counts.items() if n == len(full) * len(methods)]
    per_seed = per[per["seed"].isin(seeds)].groupby(["seed", "method"])["rank"].mean().unstack("method")
    out = pd.DataFrame({"method": avg.index, "avg_rank": avg.values})
    out["seed_mean"] = [per_seed[m].mean() if m in per_seed else np.nan for m in out["method"]]
    out["seed_min"] = [per_seed[m].min() if m in per_seed else np.nan for m in out["method"]]
    out["seed_max"] = [per_seed[m].max() if m in per_seed else np.nan for m in out["method"]]
    out["datasets"] = len(full)
    out["family"] = [registry.FAMILIES.get(f, f) for f in out["method"].map(_family)]
    out = out.sort_values(["avg_rank", "method"]).reset_index(drop=True)
    out["group"] = noise_groups(out["seed_min"].tolist(), out["seed_max"].tolist())
    return out[["method", "family", "avg_rank", "seed_mean", "seed_min", "seed_max", "datasets", "group"]]


def noise_groups(lo: list[float], hi: list[float]) -> list[str]:
    """For methods in rank order with per-seed rank ranges [lo, hi]: a label per method listing the groups it
    belongs to ("A", "AB", ...). A group is a maximal run of consecutive methods whose ranges all overlap the
    first one's (as in a critical-difference diagram): members of one group are within the seed noise."""
    n = len(lo)
    spans: list[tuple[int, int]] = []
    for i in range(n):
        j = i
        while j + 1 < n and not np.isnan(lo[j + 1]) and lo[j + 1] <= hi[i]:
            j += 1
        if j > i and not any(a <= i and j <= b for a, b in spans):
            spans.append((i, j))
    labels = [""] * n
    for k, (a, b) in enumerate(spans):
        for i in range(a, b + 1):
            labels[i] += chr(ord("A") + k % 26)
    return [lab or "—" for lab in labels]


def family_summary(doc: dict[str, Any], metric: str = "image_auroc") -> pd.DataFrame:
    """Per family: methods run, mean of the metric over its methods' dataset means, its best method by
    average rank, and that method's average rank."""
    s = summary(doc, metric).dropna(subset=["mean"])
    r = ranks(doc, metric)
    rows = []
    for fam, g in s.groupby("family", sort=False):
        fr = r[r["family"] == registry.FAMILIES.get(fam, fam)]
        best = fr.iloc[0] if not fr.empty else None
        rows.append({"family": registry.FAMILIES.get(fam, fam), "methods": ", ".join(dict.fromkeys(g["method"])),
                     f"mean {METRICS[metric]}": float(g["mean"].mean()),
                     "best method": None if best is None else best["method"],
                     "its average rank": None if best is None else float(best["avg_rank"])})
    return pd.DataFrame(rows).sort_values("its average rank", na_position="last").reset_index(drop=True) \
        if rows else pd.DataFrame(rows)


def rank_chart_data(doc: dict[str, Any], metric: str = "image_auroc") -> dict[str, Any]:
    """Inputs of views.ranks.rank_figure: methods (best first), average ranks, per-seed min and max, groups."""
    r = ranks(doc, metric)
    return {"methods": r["method"].tolist(), "avg": r["avg_rank"].tolist(), "lo": r["seed_min"].tolist(),
            "hi": r["seed_max"].tolist(), "groups": r["group"].tolist(), "n_datasets": int(r["datasets"].max())
            if not r.empty else 0, "n_seeds": int(units_frame(doc)["seed"].nunique())}


def csv_bytes(doc: dict[str, Any], metric: str = "image_auroc") -> bytes:
    """Every unit and the summary, as CSV (units then a blank line then the summary)."""
    return (units_frame(doc).to_csv(index=False) + "\n" + summary(doc, metric).to_csv(index=False)).encode()


def json_bytes(doc: dict[str, Any]) -> bytes:
    """The sweep as sweep.json."""
    return json.dumps({k: v for k, v in doc.items() if not k.startswith("_")}, indent=1).encode()


def report_html(doc: dict[str, Any]) -> bytes:
    """The shareable HTML report of a sweep (see dashboard.services.report); never raises."""
    from dashboard.services.report import download_bytes, sweep_report

    return download_bytes(sweep_report, doc, Path(doc["_dir"]) if doc.get("_dir") else None)
