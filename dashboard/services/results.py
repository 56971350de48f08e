"""Results: the dashboard's stored results of each dataset (written atomically as each method finishes)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dashboard.services.common import log
from dashboard.services.data import _dataset
from engine.cache import atomic_write
from engine.data import cache_root
from engine.device import resolve_device
from engine.runner import RunConfig, k_values

if TYPE_CHECKING:
    from dashboard.services.jobs import Job


_res_lock = threading.Lock()


def _results_file(digest: str) -> Path:
    return cache_root() / "dashboard" / "results" / f"{digest}.json"


def _config_of(cfg: RunConfig) -> dict[str, Any]:
    """The results' config as the engine writes it: labeled_anomalies the held-back K, plus the K list when
    the job ran several (the labelled-anomaly curve); the resize mode and tiling (issue 17)."""
    ks = k_values(cfg.labeled_anomalies)
    out = {"image_size": cfg.image_size, "device": resolve_device(cfg.device), "backbone": cfg.backbone,
           "weights": cfg.weights, "preset": cfg.preset, "labeled_anomalies": max(ks), "seed": cfg.seed,
           "resize": cfg.resize, "tile": cfg.tile, "tile_overlap": cfg.tile_overlap if cfg.tile is not None else None}
    if len(ks) > 1:
        out["labeled_anomalies_ks"] = ks
    return out


def run_name(run: dict[str, Any]) -> str:
    """How the pages name a run: its method, with its K when the results hold several K ("devnet · K=3")."""
    return run.get("label") or run["method"]


def _persist(job: Job, runs: list[dict[str, Any]], header: dict[str, Any] | None = None) -> None:
    """Merge `runs` into the stored results of the job's dataset (same config: replace by run name; else start anew)."""
    ds = _dataset(job.dataset_path)
    config = _config_of(job.config)
    with _res_lock:
        old = latest_results(job.digest)
        same = old is not None and old.get("config") == config
        base = old if same else None
        if header is not None:
            new = {k: v for k, v in header.items() if k != "runs"}
            new["config"] = config
        elif base is not None:
            new = {k: v for k, v in base.items() if k != "runs"}
        else:
            new = {"dataset": {"path": ds.root, "name": ds.name, "digest": ds.digest, "n_train": ds.n_train,
                               "n_test": None, "defect_types": ds.defect_types, "warnings": list(ds.warnings)},
                   "config": config}
        new["dataset"]["source"] = job.dataset_path
        by_name = {run_name(r): r for r in (base or {}).get("runs", [])}
        for r in runs:
            by_name[run_name(r)] = r
        order = [run_name(r) for r in (base or {}).get("runs", [])]
        order += [run_name(r) for r in runs if run_name(r) not in order]
        new["runs"] = [by_name[m] for m in order]
        new["updated"] = time.time()
        atomic_write(_results_file(job.digest), json.dumps(new, indent=1).encode())


def latest_results(digest: str) -> dict[str, Any] | None:
    """The stored results for a dataset digest (finished methods of the last runs with one config), or None."""
    f = _results_file(digest)
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable results %s: %s", f, e)
        return None


def clear_results(digest: str) -> None:
    """Forget the stored results of a dataset (the engine cache still makes re-runs instant)."""
    _results_file(digest).unlink(missing_ok=True)


def ok_runs(results: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The runs that finished with status ok."""
    return [r for r in (results or {}).get("runs", []) if r.get("status") == "ok"]


def results_json(results: dict[str, Any]) -> bytes:
    """The whole run as results.json (schema of DESIGN §7, plus the dashboard's additions)."""
    return json.dumps(results, indent=1).encode()


def run_notes_text(run: dict[str, Any] | None) -> str:
    """A run's own notes (how training went, warnings such as a GAN's mode collapse) as one line; '' if none."""
    notes = (run or {}).get("run_notes") or {}
    return "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in notes.items() if v not in (None, ""))


def geometry_text(config: dict[str, Any]) -> str:
    """How a run's images were sized, in words: '256 px', '256 px short side, aspect kept', '... in 256 px tiles'."""
    size = config.get("image_size")
    resize, tile = config.get("resize"), config.get("tile")
    text = f"{size} px" if resize in (None, "square") else f"{size} px short side, aspect kept"
    return text + (f", in {tile} px tiles" if tile else "")
