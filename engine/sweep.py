"""Sweeps: methods × datasets × seeds as independent units on an executor, written to OUT/sweep.json (DESIGN §7).

Each unit is one (dataset, method, seed, params) job with a content key (dataset digest, method, full
parameters, options, engine version). Progress is written after every unit, so an interrupted sweep that is
started again with the same OUT skips the units already done there; a unit not in OUT but in the engine's
cache returns at once too. A failing unit is recorded as failed and the others go on.

OUT/sweep.json holds the unit records; OUT/<dataset>/seed-<s>/results.json holds the usual results of each
(dataset, seed), so `adlab report` and the dashboard read them like any `adlab run` output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import registry
from engine.api import AdlabError, ConfigError
from engine.cache import ENGINE_VERSION, atomic_write, make_key
from engine.data import discover
from engine.data.geometry import DEFAULT_OVERLAP, DEFAULT_RESIZE
from engine.executors import Executor, Unit
from engine.runner import (
    RunConfig,
    anomalies_per_type,
    check_geometry,
    k_values,
    method_params,
    needs_labels_message,
    real_ks,
    run_label,
)

SWEEP_FILE = "sweep.json"


@dataclass
class SweepConfig:
    """What to sweep. `params` holds per-method overrides as in RunConfig: {"patchcore": {"coreset_ratio": 0.1}}."""

    datasets: list[str]
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "fast"
    image_size: int | None = None
    resize: str = DEFAULT_RESIZE  # as RunConfig: keep-aspect | square, and optional tiles
    tile: int | None = None
    tile_overlap: float = DEFAULT_OVERLAP
    labeled_anomalies: int | list[int] = 0  # a list: one unit per (weak method, K), all on the same test images
    device: str = "auto"
    backbone: str = "efficientnet_lite0"
    weights: str = "auto"
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    use_cache: bool = True
    cache_root: str | None = None  # handed to every unit; on a cluster, a path every node sees
    threads_per_unit: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"datasets": list(self.datasets), "methods": list(self.methods), "seeds": list(self.seeds),
                "preset": self.preset, "image_size": self.image_size, "resize": self.resize, "tile": self.tile,
                "tile_overlap": self.tile_overlap, "labeled_anomalies": self.labeled_anomalies,
                "device": self.device, "backbone": self.backbone, "weights": self.weights,
                "params": self.params, "threads_per_unit": self.threads_per_unit}


@dataclass
class SweepProgress:
    """Counts of units; `eta_s` from the mean time of the units computed so far (None before the first)."""

    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    reused: int = 0  # units taken from an earlier run of this sweep
    elapsed_s: float = 0.0
    eta_s: float | None = None
    last: str = ""

    def line(self) -> str:
        eta = "—" if self.eta_s is None else _duration(self.eta_s)
        return (f"{self.done}/{self.total} done ({self.failed} failed, {self.reused} reused) · {self.running} "
                f"running · {_duration(self.elapsed_s)} elapsed · ETA {eta}" + (f" · {self.last}" if self.last else ""))


SweepCallback = Callable[[SweepProgress], None]


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class _Planned:
    unit: Unit
    key: str
    dataset: dict[str, Any]  # name, path, digest (or error)
    label: str = ""  # the method, with its K when the sweep has several K


def check_config(cfg: SweepConfig) -> None:
    """Raise ConfigError for what would fail every unit the same way: no datasets, methods or seeds, unknown
    methods or parameters, weakly supervised methods without labelled anomalies."""
    if not cfg.datasets:
        raise ConfigError("no datasets given")
    if not cfg.methods:
        raise ConfigError("no methods selected")
    if not cfg.seeds:
        raise ConfigError("no seeds given")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds repeat: {cfg.seeds}")
    if cfg.preset not in ("test", "fast", "quality"):
        raise ConfigError(f"unknown preset {cfg.preset!r}; use test, fast or quality")
    unknown = [m for m in cfg.params if m not in cfg.methods]
    if unknown:
        raise ConfigError(f"parameters given for {', '.join(unknown)}, which is not among the methods")
    rc = RunConfig(methods=cfg.methods, preset=cfg.preset, params=cfg.params, resize=cfg.resize, tile=cfg.tile,
                   tile_overlap=cfg.tile_overlap)
    check_geometry(rc)
    for m in cfg.methods:
        method_params(m, rc)  # unknown method or mistyped parameter: ConfigError naming it
    weak = [m for m in cfg.methods if registry.info(m).supervision == "weak"]
    if weak and max(k_values(cfg.labeled_anomalies)) <= 0:
        raise ConfigError(needs_labels_message(weak))


def plan(cfg: SweepConfig) -> list[_Planned]:
    """The units in run order (dataset, then seed, then method: a dataset's features are made once, early).

    A dataset that fails validation still gets its units; they fail with its problems when run."""
    check_config(cfg)
    ks = k_values(cfg.labeled_anomalies)
    several = len(ks) > 1
    names: dict[str, int] = {}
    out = []
    for path in cfg.datasets:
        ds_ks = ks  # the K this dataset really labels (runner.real_ks: a K above what its types give is lowered)
        try:
            ds = discover(path)
            info: dict[str, Any] = {"name": ds.name, "path": str(path), "digest": ds.digest}
            real, _ = real_ks(anomalies_per_type(ds), ks)
            ds_ks = sorted(set(real.values()))
        except AdlabError as e:
            info = {"name": Path(path).name or str(path), "path": str(path), "digest": None, "error": str(e)}
        n = names.get(info["name"], 0)
        names[info["name"]] = n + 1
        if n:  # two datasets with one name (mvtec/screw, other/screw): keep their output folders apart
            info["name"] = f"{info['name']}-{n + 1}"
        # workers do not share this process's working directory: give them an absolute path (on a cluster,
        # one that every node sees at the same place)
        where = str(Path(path).resolve()) if Path(path).exists() else str(path)
        for seed in cfg.seeds:
            for m in cfg.methods:
                weak = registry.info(m).supervision == "weak"
                for k in (ds_ks if several and weak else [None]):
                    u = Unit(dataset=where, method=m, seed=seed, params=dict(cfg.params.get(m, {})),
                             preset=cfg.preset, image_size=cfg.image_size, resize=cfg.resize, tile=cfg.tile,
                             tile_overlap=cfg.tile_overlap, labeled_anomalies=cfg.labeled_anomalies,
                             only_k=k, device=cfg.device, backbone=cfg.backbone, weights=cfg.weights,
                             use_cache=cfg.use_cache, cache_root=cfg.cache_root, threads=cfg.threads_per_unit)
                    full = method_params(m, RunConfig(methods=[m], preset=cfg.preset, seed=seed,
                                                      backbone=cfg.backbone, weights=cfg.weights, params=cfg.params))
                    # a single K keeps the key it always had
                    labels: Any = cfg.labeled_anomalies if not several else [ds_ks, k]
                    # the default geometry keeps the key it always had
                    geometry = ([] if cfg.resize == DEFAULT_RESIZE and cfg.tile is None
                                else [cfg.resize, cfg.tile, cfg.tile_overlap])
                    key = make_key("sweep-unit", info["digest"] or info["path"], m, full, cfg.image_size,
                                   labels, cfg.device, ENGINE_VERSION, *geometry)
                    out.append(_Planned(u, key, info, run_label(m, k, several)))
    return out


def results_path(dataset_name: str, seed: int) -> str:
    """Where a (dataset, seed)'s results.json lives, relative to OUT."""
    return f"{dataset_name}/seed-{seed}/results.json"


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(data, indent=1, default=str).encode())


def load_sweep(out: str | Path) -> dict[str, Any]:
    """OUT/sweep.json (or the file itself) as a dict; ConfigError when missing or unreadable."""
    p = Path(out)
    f = p / SWEEP_FILE if p.is_dir() else p
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {SWEEP_FILE} in {p}: run `adlab sweep ... --out {p}` first") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f} is not a readable sweep file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("units"), list):
        raise ConfigError(f"{f} is not a sweep file (no 'units' list)")
    return data


def _earlier(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """(ok unit records by key, their full run records by key) from a previous run of this sweep in OUT."""
    try:
        old = load_sweep(out)
    except ConfigError:
        return {}, {}
    units = {u["key"]: u for u in old["units"] if u.get("status") == "ok" and u.get("key")}
    runs: dict[str, dict[str, Any]] = {}
    for rel in {u.get("results") for u in units.values() if u.get("results")}:
        try:
            res = json.loads((out / rel).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for r in res.get("runs", []):
            if r.get("unit_key") in units:
                runs[r["unit_key"]] = r
    return units, runs


def _unit_record(p: _Planned, run: dict[str, Any], wall_s: float | None, host: str | None) -> dict[str, Any]:
    u = p.unit
    rec = {"dataset": p.dataset["name"], "method": u.method, "seed": u.seed, "params": run.get("params") or u.params,
           "status": run.get("status", "failed"), "error": run.get("error"), "metrics": run.get("metrics"),
           "timing": run.get("timing")}
    # additions to the public fields above
    rec.update({"key": p.key, "family": run.get("family") or registry.info(u.method).family,
                "dataset_path": p.dataset["path"], "dataset_digest": p.dataset["digest"],
                "results": results_path(p.dataset["name"], u.seed), "cached": bool(run.get("cached")),
                "wall_s": wall_s, "host": host, "faithful": run.get("faithful", True),
                "label": p.label or u.method, "labeled_k": u.only_k,
                "train_precision": run.get("train_precision")})  # how its network was trained; None: no training
    return rec


def run_sweep(cfg: SweepConfig, out: str | Path, executor: Executor, *,
              progress: SweepCallback | None = None, resume: bool = True) -> dict[str, Any]:
    """Run every unit of `cfg` on `executor`; write and return OUT/sweep.json's content.

    With `resume`, units recorded as ok in an earlier OUT/sweep.json with the same key are reused.
    Raises ConfigError for a sweep that cannot start (check_config); a unit's failure never raises.
    """
    out = Path(out)
    planned = plan(cfg)
    old_units, old_runs = _earlier(out) if resume else ({}, {})
    t_start = time.time()
    records: list[dict[str, Any] | None] = [None] * len(planned)
    headers: dict[str, dict[str, Any]] = {}  # results path -> run_methods header
    runs: dict[str, list[tuple[int, dict[str, Any]]]] = {}  # results path -> (unit index, run)
    prog = SweepProgress(total=len(planned))
    computed_s: list[float] = []
    in_flight: set[int] = set()

    def doc(complete: bool) -> dict[str, Any]:
        return {"units": [r for r in records if r is not None], "config": cfg.to_dict(),
                "datasets": _datasets(planned), "executor": executor.describe(), "engine_version": ENGINE_VERSION,
                "started": t_start, "wall_s": round(time.time() - t_start, 3), "complete": complete,
                "progress": {"total": prog.total, "done": prog.done, "failed": prog.failed, "reused": prog.reused}}

    def write_results(rel: str) -> None:
        header = headers.get(rel)
        if header is None:  # every unit of this (dataset, seed) failed before the data loaded
            header = {"dataset": {}, "config": {}}
        ordered = [r for _, r in sorted(runs.get(rel, []), key=lambda t: t[0])]
        _atomic_json(out / rel, {**header, "runs": ordered})

    def tell(last: str = "") -> None:
        prog.elapsed_s = time.time() - t_start
        prog.running = min(len(in_flight), executor.slots)
        left = prog.total - prog.done
        prog.eta_s = (sum(computed_s) / len(computed_s) * left / max(1, executor.slots)) if computed_s else (
            0.0 if left == 0 else None)
        prog.last = last
        if progress:
            progress(prog)

    def finish(i: int, run: dict[str, Any], header: dict[str, Any] | None, wall_s: float | None, host: str | None,
               reused: bool = False) -> None:
        p = planned[i]
        run = {**run, "unit_key": p.key, "seed": p.unit.seed}
        rec = _unit_record(p, run, wall_s, host)
        if reused:
            rec = {**old_units[p.key], **{k: rec[k] for k in ("dataset", "results")}, "reused": True}
        records[i] = rec
        rel = rec["results"]
        if header is not None:
            headers.setdefault(rel, header)
        runs.setdefault(rel, []).append((i, run))
        in_flight.discard(i)
        prog.done += 1
        prog.failed += rec["status"] != "ok"
        prog.reused += reused
        if not reused and not run.get("cached") and wall_s is not None:
            computed_s.append(wall_s)
        write_results(rel)
        _atomic_json(out / SWEEP_FILE, doc(False))
        tell(f"{p.dataset['name']} · {p.label or p.unit.method} · seed {p.unit.seed}: {rec['status']}")

    todo: list[int] = []
    for i, p in enumerate(planned):
        if p.key in old_units and p.key in old_runs:
            rel = results_path(p.dataset["name"], p.unit.seed)
            try:
                header = {k: v for k, v in json.loads((out / rel).read_text()).items() if k != "runs"}
            except (OSError, json.JSONDecodeError):
                header = None
            finish(i, old_runs[p.key], header, old_units[p.key].get("wall_s"), old_units[p.key].get("host"),
                   reused=True)
        else:
            todo.append(i)
    tell()

    def on_start(j: int) -> None:
        in_flight.add(todo[j])
        tell(f"started {planned[todo[j]].dataset['name']} · {planned[todo[j]].label} · "
             f"seed {planned[todo[j]].unit.seed}")

    def on_done(j: int, outcome: dict[str, Any]) -> None:
        finish(todo[j], outcome["run"], outcome.get("results"), outcome.get("wall_s"), outcome.get("host"))

    executor.run([planned[i].unit for i in todo], on_start, on_done)
    final = doc(True)
    _atomic_json(out / SWEEP_FILE, final)
    return final


def _datasets(planned: list[_Planned]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for p in planned:
        seen.setdefault(p.dataset["name"], p.dataset)
    return list(seen.values())
