"""Run several methods on one dataset: shared features, caching, timing, progress, failure isolation.

`run_methods` is what the CLI and the dashboard call. Each method runs inside its own try/except:
one that raises, returns NaN, or runs out of memory is recorded as `failed` with its message, and
the others still complete. Results follow the schema of DESIGN §7 (fields are only ever added).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import estimates, registry, saved_models
from engine.api import AdlabError, ConfigError, ImageSet, MethodFailure, Prediction
from engine.backbones import weights_description
from engine.cache import ENGINE_VERSION, Cache, default_cache, make_key
from engine.components.features import backbone_seconds, extract_features, forget, hand_over, run_layers, using_cache
from engine.data import Dataset, discover, load_split
from engine.data.geometry import DEFAULT_OVERLAP, DEFAULT_RESIZE, check_resize, check_tile, work_units
from engine.data.loader import Shape, as_shape
from engine.data.shift import normal_shift
from engine.device import resolve_device, train_precision
from engine.heap import trim
from engine.metrics import evaluate
from engine.threads import job as thread_job

log = logging.getLogger("adlab.runner")

# progress(method, stage, fraction or None, info)
RunProgress = Callable[[str, str, float | None, dict[str, Any]], None]


class Cancelled(AdlabError):
    """The user cancelled the run."""


@dataclass
class RunConfig:
    """What to run. `params` holds per-method parameter overrides: {"patchcore": {"coreset_ratio": 0.1}}."""

    methods: list[str]
    image_size: int | None = None  # None: 256, or the images' own size when smaller (Dataset.working_size)
    # "keep-aspect": the short side is image_size, the long side follows the images' aspect (equal to "square" on
    # square data); "square": squash to image_size x image_size (engine.data.geometry).
    resize: str = DEFAULT_RESIZE
    tile: int | None = None  # cut images into overlapping tile x tile squares; image_size None then = native size
    tile_overlap: float = DEFAULT_OVERLAP
    device: str = "auto"
    backbone: str = "efficientnet_lite0"
    weights: str = "auto"
    preset: str = "fast"
    # K labelled anomalies per defect type, or several K (a labelled-anomaly curve): one run per (weak method, K),
    # all evaluated on the test images left after the largest K is held back (see labeled_rows_by_k)
    labeled_anomalies: int | Sequence[int] = 0
    # one K of labeled_anomalies only (a sweep unit): weak methods run at that K alone, on the same held-back
    # images as the whole curve; None runs every K
    only_k: int | None = None
    seed: int = 0
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    use_cache: bool = True
    # Keep each fitted model in the cache (kind "models", the run's key) so it can be saved or score new images
    # later (dashboard Try page). Not part of the cache key; a cached run without its model is then refitted.
    keep_models: bool = False

    @property
    def ks(self) -> list[int]:
        """The K values, sorted and distinct ([K] for a single K)."""
        return k_values(self.labeled_anomalies)


def k_values(labeled_anomalies: int | Sequence[int]) -> list[int]:
    """K as a sorted list of distinct non-negative ints; ConfigError for an empty list or a negative K."""
    ks = [labeled_anomalies] if isinstance(labeled_anomalies, int) else list(labeled_anomalies)
    if not ks:
        raise ConfigError("labelled anomalies: give at least one K (e.g. 0,1,3,10)")
    if any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in ks):
        raise ConfigError(f"labelled anomalies {ks}: each K must be a whole number ≥ 0")
    return sorted(set(ks))


def anomalies_per_type(ds: Dataset) -> dict[str, int]:
    """Anomalous test images per defect type of `ds`, counted from its sample list (no image is read)."""
    counts: dict[str, int] = {}
    for s in ds.test:
        if s.label == 1:
            counts[s.defect_type] = counts.get(s.defect_type, 0) + 1
    return counts


def real_ks(per_type: Mapping[str, int], ks: Sequence[int]) -> tuple[dict[int, int], str | None]:
    """The K each asked K really labels on a dataset, and a note when that differs from what was asked.

    A defect type of n anomalous test images gives min(K, n − 1) of them (one always stays for evaluation,
    labeled_rows_by_k), so K labels min(K, max_t(n_t − 1)) images of the largest types: that number is the run's
    K, and the rows it labels are the same as the asked K's. Returns ({asked K: real K}, note or None); the note
    names the largest type when it lowers K, and the types that give fewer than the real K.
    """
    top = max((n - 1 for n in per_type.values()), default=0)
    real = {k: max(0, min(k, top)) for k in ks}
    notes = []
    lowered = sorted(k for k, r in real.items() if r != k)
    if lowered and top > 0:
        biggest = max(per_type, key=lambda t: (per_type[t], t))
        notes.append(f"K = {', '.join(map(str, lowered))} labels {top} per defect type here, recorded as K = {top}: "
                     f"the largest type ({biggest}) has {per_type[biggest]} anomalous test images and one of each "
                     "type stays for evaluation")
    k_max = max(real.values(), default=0)
    small = sorted(t for t, n in per_type.items() if n - 1 < k_max)
    if small:
        notes.append(f"at K = {k_max}, " + ", ".join(f"{t} gives {max(0, per_type[t] - 1)} of its {per_type[t]}"
                                                        for t in small) + " (one stays for evaluation)")
    return real, "; ".join(notes) if notes else None


def resolve_ks(ds: Dataset, cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """`cfg` with its K replaced by what they really label on `ds` (real_ks; equal K merge), and the note.

    ConfigError when weakly supervised methods are asked for K ≥ 1 and no defect type of `ds` has two anomalous
    test images (none can be labelled while one stays for evaluation), and for an only_k that is neither an
    asked K nor a real one.
    """
    asked = cfg.ks
    per_type = anomalies_per_type(ds)
    real, note = real_ks(per_type, asked)
    weak = [n for n in cfg.methods if registry.info(n).supervision == "weak"]
    if weak and max(asked) > 0 and max(real.values()) == 0:
        counts = ", ".join(f"{t}: {n}" for t, n in sorted(per_type.items())) or "none"
        raise ConfigError(f"{', '.join(weak)} need labelled anomalies, but no defect type of {ds.name} has two or "
                          f"more anomalous test images (anomalous test images per type: {counts}), so none can be "
                          "labelled while one stays for evaluation")
    ks = sorted(set(real.values()))
    only = cfg.only_k
    if only is not None:
        if only in real:
            only = real[only]
        elif only not in ks:
            raise ConfigError(f"K = {only} is not among the labelled anomalies {asked}")
    labeled: int | list[int] = ks[0] if isinstance(cfg.labeled_anomalies, int) else ks
    return replace(cfg, labeled_anomalies=labeled, only_k=only), note


def needs_labels_message(names: Sequence[str]) -> str:
    """The error for weakly supervised methods asked to run without labelled anomalies (K = 0)."""
    return (f"{', '.join(names)} need labelled anomalies: set labelled anomalies K ≥ 1 "
            "(K anomalous test images per defect type move into training)")


def run_label(method: str, k: int | None, several: bool) -> str:
    """How a run is named in tables, plots and progress: the method, with its K when a run holds several K."""
    return f"{method} · K={k}" if several and k is not None else method


def run_plan(cfg: RunConfig) -> list[tuple[str, int | None]]:
    """(method, K) of every run in order: each weakly supervised method once per K, every other method once
    (K = None: it ignores labels). Methods keep the order of cfg.methods, K rises."""
    ks = cfg.ks
    if cfg.only_k is not None:
        if cfg.only_k not in ks:
            raise ConfigError(f"K = {cfg.only_k} is not among the labelled anomalies {ks}")
        ks = [cfg.only_k]
    return [(name, k) for name in cfg.methods
            for k in (ks if registry.info(name).supervision == "weak" else [None])]


def run_labels(cfg: RunConfig) -> list[str]:
    """The names of the runs of `cfg` in order, as progress reports them and records carry them ("label")."""
    several = len(cfg.ks) > 1
    return [run_label(name, k, several) for name, k in run_plan(cfg)]


def _noop(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
    pass


class _PeakMemory:
    """Samples this process's resident memory in a thread; peak_mb after stop()."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> _PeakMemory:
        self.peak = self.rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def peak_mb(self) -> float:
        mb = self.peak / 2**20
        if torch.cuda.is_available():
            mb = max(mb, torch.cuda.max_memory_allocated() / 2**20)
        return round(mb, 1)


def labeled_rows_by_k(test: ImageSet, ks: Sequence[int], seed: int) -> dict[int, list[int]]:
    """For each K, the rows of K anomalous test images per defect type (seeded) for the labelled training set.

    Each type's anomalous rows are put in one seeded random order and K takes its first min(K, n_type - 1), so the
    rows for a smaller K are a subset of those for a larger K, and at least one image of each type stays for
    evaluation. Returns {K: sorted rows}.
    """
    rng = np.random.default_rng(seed)
    pairs = list(zip(test.defect_types, test.labels.tolist(), strict=True))
    orders = []
    for t in sorted({d for d, y in pairs if y == 1}):
        rows = np.asarray([i for i, (d, y) in enumerate(pairs) if d == t and y == 1])
        orders.append(rng.permutation(rows).tolist())
    return {k: sorted(r for order in orders for r in order[:max(0, min(k, len(order) - 1))]) for k in ks}


def split_labeled(test: ImageSet, k: int, seed: int) -> tuple[list[int], list[int]]:
    """Choose k anomalous test images per defect type (seeded) for the labelled training set.

    Returns (labelled_rows, remaining_rows). At least one image of each type stays for evaluation; the rows
    chosen for a smaller k are a subset of those for a larger k (labeled_rows_by_k).
    """
    chosen = labeled_rows_by_k(test, [k], seed)[k]
    chosen_set = set(chosen)
    return chosen, [i for i in range(len(test)) if i not in chosen_set]


_split_cache: dict[tuple[str, str, tuple[int, int]], ImageSet] = {}
_split_lock = threading.Lock()


def load_images(ds: Dataset, split: str, image_size: Shape) -> ImageSet:
    """load_split with a small per-process memo (the dashboard re-reads the same dataset often)."""
    key = (ds.digest, split, as_shape(image_size))
    with _split_lock:
        if key in _split_cache:
            return _split_cache[key]
    s = load_split(ds, split, image_size)
    with _split_lock:
        if len(_split_cache) > 6:
            _split_cache.pop(next(iter(_split_cache)))
        _split_cache[key] = s
    return s


def method_params(name: str, cfg: RunConfig) -> dict[str, Any]:
    """Full parameters of a method for this run: preset, then run-wide options, then explicit overrides."""
    mi = registry.info(name)
    det = registry.create(name, preset=cfg.preset, **cfg.params.get(name, {}))
    params = det.get_params()
    common = {"backbone": cfg.backbone, "weights": cfg.weights, "seed": cfg.seed}
    for k, v in common.items():
        if k in params and k not in cfg.params.get(name, {}):
            params[k] = v
    del mi
    return params


def check_geometry(cfg: RunConfig) -> None:
    """ConfigError for an unknown resize mode or a bad tile size / overlap."""
    try:
        check_resize(cfg.resize)
        check_tile(cfg.tile, cfg.tile_overlap)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run_key(ds_digest: str, name: str, params: dict[str, Any], cfg: RunConfig, labeled: list[Any],
            shape: tuple[int, int] | None = None, precision: str = "fp32") -> str:
    """Cache key of a method's fitted model and predictions (DESIGN §8). `shape` (H, W) and the tiling enter it
    only when they differ from a square image_size without tiles, and the training precision only when it is not
    fp32 on CPU (engine.device.train_precision), so keys of the earlier runs stay as they were."""
    wd = weights_description(params.get("backbone", cfg.backbone), params.get("weights", cfg.weights))
    size: Any = cfg.image_size
    if (shape is not None and shape[0] != shape[1]) or cfg.tile is not None:
        size = [list(shape or (cfg.image_size, cfg.image_size)), cfg.tile, cfg.tile_overlap]
    parts: list[Any] = ["run", ds_digest, name, params, size, wd, ENGINE_VERSION, labeled]
    if precision == "bf16-mixed":
        parts.append("cpu-bf16")
    return make_key(*parts)


def load_prediction(record: dict[str, Any], cache: Cache | None = None) -> Prediction | None:
    """The stored scores and maps (N, H, W) of a finished run record, or None when not cached."""
    cache = cache or default_cache()
    key = record.get("cache_key")
    if not key:
        return None
    hit = cache.load("predictions", key)
    if hit is None:
        return None
    t = hit[0]
    return Prediction(scores=t["scores"], maps=t["maps"].float() if "maps" in t else None)


def check_run_config(cfg: RunConfig, *, saving: bool = False) -> None:
    """Raise ConfigError for what makes `cfg` unable to run, before any data is read: no methods, an unknown
    method or parameter, a bad geometry, weak methods without labelled anomalies, saving models of several K."""
    if not cfg.methods:
        raise ConfigError("no methods selected")
    infos = {name: registry.info(name) for name in cfg.methods}
    check_geometry(cfg)
    for name in cfg.methods:
        method_params(name, cfg)  # a misspelt or mistyped parameter is a ConfigError now, not a failed fit later
    ks = cfg.ks
    weak = [n for n, mi in infos.items() if mi.supervision == "weak"]
    if weak and max(ks) <= 0:
        raise ConfigError(needs_labels_message(weak))
    if len(ks) > 1 and saving:
        raise ConfigError(f"saving models takes one K at a time (asked for K = {', '.join(map(str, ks))}): "
                          "run again with the one K whose models you want")


def run_methods(data: str | Path | Dataset, cfg: RunConfig, *, progress: RunProgress = _noop,
                cancel: threading.Event | None = None, on_result: Callable[[dict[str, Any]], None] | None = None,
                cache: Cache | None = None, save_models: str | Path | None = None) -> dict[str, Any]:
    """Run every method of `cfg` on `data`; returns the results dict of DESIGN §7.

    Data problems raise DataValidationError before anything runs; method problems never raise: they
    become runs with status "failed". Cancellation (the `cancel` event) raises Cancelled between steps.
    save_models: a folder receiving each fitted method (engine.saved_models format); a method whose model
    cannot be written there fails with that message.
    """
    cache = cache or (default_cache() if cfg.use_cache else Cache(enabled=False))
    check_run_config(cfg, saving=save_models is not None)
    infos = {name: registry.info(name) for name in cfg.methods}
    ks = cfg.ks
    device = resolve_device(cfg.device)
    ds = data if isinstance(data, Dataset) else discover(data)
    asked = ks
    cfg, k_note = resolve_ks(ds, cfg)  # the K recorded are the numbers really labelled on this dataset
    ks = cfg.ks
    plan = run_plan(cfg)
    several = len(ks) > 1

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("run cancelled")

    base_mb = _PeakMemory.rss() / 2**20  # before the images are loaded: estimates scale what comes on top
    progress("", "loading", 0.0, {"dataset": ds.name})
    shape = ds.working_shape(cfg.image_size, cfg.resize, cfg.tile)
    if cfg.image_size is None:
        cfg = replace(cfg, image_size=min(shape))
    assert cfg.image_size is not None
    train = load_images(ds, "train", shape)
    test_all = load_images(ds, "test", shape)
    rows_by_k = labeled_rows_by_k(test_all, ks, cfg.seed)
    held = rows_by_k[max(ks)]  # left out of every evaluation, whatever K a run uses
    held_set = set(held)
    eval_rows = [i for i in range(len(test_all)) if i not in held_set]
    test = test_all.subset(eval_rows) if held else test_all
    warnings = list(ds.warnings)
    if k_note:
        warnings.append(k_note)
    shift = normal_shift(train, test)  # a shift between the normal sets would be scored as if it were defects
    trim()  # the loader threads' and the check's freed buffers
    if shift:
        warnings.append(shift)
    results: dict[str, Any] = {
        "dataset": {"path": str(ds.root), "name": ds.name, "digest": ds.digest, "n_train": len(train),
                    "n_test": len(test), "defect_types": ds.defect_types, "warnings": warnings},
        "config": {"image_size": cfg.image_size, "device": device, "backbone": cfg.backbone, "weights": cfg.weights,
                   "preset": cfg.preset, "labeled_anomalies": max(ks), "seed": cfg.seed,
                   # issue 17 (added): image_size is the short side of image_shape [H, W]; tile null = whole images
                   "resize": cfg.resize, "image_shape": list(shape), "tile": cfg.tile,
                   "tile_overlap": cfg.tile_overlap if cfg.tile is not None else None,
                   "tiles_per_image": work_units(shape, cfg.tile, cfg.tile_overlap)[0]},
        "labeled_anomalies": {"k": max(ks), "paths": [test_all.paths[i] for i in held]},
        "engine_version": ENGINE_VERSION,
        "runs": [],
    }
    if several:  # additions: the K of the curve; config.labeled_anomalies stays one int (the held-back K)
        results["config"]["labeled_anomalies_ks"] = ks
        results["labeled_anomalies"]["ks"] = ks
    if asked != ks:  # addition: the K asked for, when the dataset could not give them all (resolve_ks)
        results["config"]["labeled_anomalies_asked"] = asked
    needs = [_feature_needs(name, cfg) for name, _ in plan]
    reads_pixels = [_reads_pixels(infos[name], needs[i]) for i, (name, _) in enumerate(plan)]
    for i, (name, k) in enumerate(plan):
        check_cancel()
        mi = infos[name]
        label = run_label(name, k, several)
        # unsupervised methods get the held-back images as today (they ignore them); weak ones their K's subset
        lab_rows = held if k is None else rows_by_k[k]
        anomalies = test_all.subset(lab_rows) if lab_rows else None
        unit = _Unit(name=name, label=label, k=k, labeled_rows=lab_rows, held_rows=held)
        if k is not None and k <= 0:  # this (method, K) alone cannot run; the other runs go on
            rec = _empty_record(name, mi, cfg, unit)
            rec["error"] = needs_labels_message([name])
            progress(label, "failed", None, {"error": rec["error"]})
        else:
            later = frozenset().union(*(n for n in needs[i + 1:]))  # (backbone, weights, layer) read later
            run_wide = frozenset(layer for n in needs[i:] for _, _, layer in n)
            with using_cache(cache), run_layers(run_wide), thread_job() as threads:
                rec = _run_one(unit, mi, cfg, device, ds, train, test, test_all, anomalies, cache, progress,
                               cancel, save=None if save_models is None else (Path(save_models), results),
                               later=later, pixels_later=any(reads_pixels[i + 1:]))
            if rec["status"] == "ok":
                rec["tiles_per_image"] = _tiles_used(name, cfg, shape)
            if rec["status"] == "ok" and not rec.get("cached"):
                rec["timing"]["threads"] = threads.threads
        results["runs"].append(rec)
        try:
            estimates.record(rec, n_train=len(train), n_test=len(test), image_size=cfg.image_size,
                             preset=cfg.preset, device=device, base_mb=base_mb, shape=shape, tile=cfg.tile,
                             overlap=cfg.tile_overlap)
        except OSError as e:  # the estimates are a convenience: never fail a run over them
            log.warning("could not store the time/memory estimate: %s", e)
        if on_result:
            on_result(rec)
    return results


@dataclass(frozen=True)
class _Unit:
    """One run of a method: its K (None for methods that ignore labels), the labelled rows it trains with and the
    rows held back from every evaluation."""

    name: str
    label: str
    k: int | None
    labeled_rows: list[int]
    held_rows: list[int]


def _empty_record(name: str, mi: registry.MethodInfo, cfg: RunConfig, unit: _Unit) -> dict[str, Any]:
    """A run record with status failed and no results yet (DESIGN §7 plus the added fields)."""
    return {"method": name, "family": mi.family, "params": {}, "weights": None,
            "status": "failed", "error": None, "metrics": None,
            "timing": {"fit_s": None, "predict_s": None, "images_per_s": None, "peak_mem_mb": None},
            "images": [], "faithful": mi.faithful, "localises": mi.localises, "cached": False,
            "preset": cfg.preset, "reduced": registry.is_reduced(name, cfg.preset),
            "label": unit.label, "labeled_k": unit.k}


def failed_record(name: str, cfg: RunConfig, label: str, k: int | None, error: str) -> dict[str, Any]:
    """The record of a run that could not produce results (status "failed", `error` for the user)."""
    rec = _empty_record(name, registry.info(name), cfg, _Unit(name=name, label=label, k=k, labeled_rows=[],
                                                               held_rows=[]))
    rec["error"] = error
    return rec


def _run_one(unit: _Unit, mi: registry.MethodInfo, cfg: RunConfig, device: str, ds: Dataset, train: ImageSet,
             test: ImageSet, test_all: ImageSet, anomalies: ImageSet | None, cache: Cache,
             progress: RunProgress, cancel: threading.Event | None,
             save: tuple[Path, dict[str, Any]] | None = None,
             later: frozenset[tuple[str, str, str]] = frozenset(), pixels_later: bool = True) -> dict[str, Any]:
    """One run: from the cache when it holds the run (and its model, when one is to be kept), else fit,
    predict and evaluate. save: (folder, results so far) to write the fitted model to (saved_models format).
    later: the (backbone, weights, layer) features the runs after this one read; the others are dropped from
    memory once this run is done with them (the training split's after fit, the test split's after predict).
    pixels_later: whether a later run reads the images themselves; when none does and this one reads only shared
    features, the splits' pixels are released before its backbone passes, which read them from the files a
    batch at a time (ImageSet.release and .rows; read back whole if anything asks for them after all).

    The test split's features are made after fit, not with the training split's, so the two splits' features
    (and the fitted model beside both) are not held at once; the backbone seconds charged are the same. Weakly
    supervised methods (whose labelled anomalies come from the test split) still get both before fit."""
    name = unit.name
    rec = _empty_record(name, mi, cfg, unit)
    if unit.k is not None:
        rec["labeled_paths"] = [test_all.paths[i] for i in unit.labeled_rows]

    def prog(stage: str, fraction: float | None = None, info: dict[str, Any] | None = None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("run cancelled")
        progress(unit.label, stage, fraction, info or {})

    try:
        params = method_params(name, cfg)
        rec["params"] = _jsonable(params)
        rec["weights"] = (weights_description(params.get("backbone", cfg.backbone), params.get("weights", cfg.weights))
                          if mi.uses_backbone else "none (trained from scratch on the images)")
        # the held-back rows join the key only when they differ from the labelled ones (a single K keeps its key)
        labeled = (unit.labeled_rows if unit.labeled_rows == unit.held_rows
                   else [unit.labeled_rows, unit.held_rows])
        # CUDA's mixed precision is not in the key (as before); bf16 on CPU is, so ADLAB_CPU_BF16=0 retrains
        # the precision of the training steps, for tables (None: nothing trained); the note says it too
        rec["train_precision"] = train_precision(device, mi.cpu_bf16) if mi.trained else None
        precision = rec["train_precision"] if device == "cpu" and mi.trained else "fp32"
        key = run_key(ds.digest, name, params, cfg, labeled, train.size, precision)
        rec["cache_key"] = key
        need_model = cfg.keep_models or save is not None

        def from_cache(stored: dict[str, Any]) -> dict[str, Any]:
            # the same params may come from another preset; the label depends on the other runs of this call
            stored.update(preset=rec["preset"], reduced=rec["reduced"], label=unit.label, labeled_k=unit.k)
            stored.setdefault("train_precision", rec["train_precision"])  # the key holds it; older records lack it
            if save is not None:
                _save_model(save, stored, cache=cache)
            prog("done", 1.0, {"cached": True})
            return stored

        stored = _cached_record(cache, key, cfg, need_model)
        if stored is not None:
            return from_cache(stored)
        with cache.lock("runs", key):
            stored = _cached_record(cache, key, cfg, need_model)  # another session may have finished it meanwhile
            if stored is not None:
                return from_cache(stored)
            det = registry.create(name, **params).to(device).set_tiling(cfg.tile, cfg.tile_overlap)
            shared_fit_s = shared_pred_s = 0.0
            layers = det.feature_layers()
            # A weakly supervised fit reads its labelled anomalies' features, sliced from the test split's: those
            # are made before fit, as they always were (a pass over the labelled images alone would batch them
            # differently, and the features depend on the batch in their last bits).
            test_first = bool(layers) and mi.supervision == "weak"
            # A method that reads only the shared features, with no later run reading pixels, need not hold the
            # images at all (on mt: 296 MB of uint8 beside the coreset's or Gaussians' peak): each backbone pass
            # reads its batches from the files.
            release = not pixels_later and not test_first and not _reads_pixels(mi, layers)
            if release:
                _release([train, test_all])
            if layers:
                shared_fit_s = _warm_features(det, layers, "train", train, train, device, prog)
            if test_first:
                shared_pred_s = _warm_features(det, layers, "test", test_all, test, device, prog)
            with _PeakMemory() as mem_fit:
                prog("fit", 0.0)
                t0 = time.perf_counter()
                det.fit(train, anomalies=anomalies, progress=prog)
                fit_s = time.perf_counter() - t0 + shared_fit_s
            if layers:
                _forget_unread(det, layers, [train], later)
            if layers and not test_first:
                shared_pred_s = _warm_features(det, layers, "test", test_all, test, device, prog)
            if release:
                _release([test_all])
            if layers and det.reads_test_features_once:
                _unread_later(det, layers, [test_all, test], later, hand_over)
            with _PeakMemory() as mem_pred:
                prog("predict", 0.0)
                t0 = time.perf_counter()
                pred = det.predict(test)
                predict_s = time.perf_counter() - t0 + shared_pred_s
            if layers:
                _forget_unread(det, layers, [test_all, test], later)
            peak_mb = max(mem_fit.peak_mb, mem_pred.peak_mb)
            scores = pred.scores.numpy()
            if not np.all(np.isfinite(scores)):
                raise MethodFailure("non-finite scores")
            extra = getattr(det, "run_notes_", None)
            if cfg.use_cache and need_model:
                with cache.writing("models", key) as tmp:
                    if tmp is not None:
                        det.save(tmp)
            if save is None:
                # The fitted model (PaDiM's inverse covariances: hundreds of MB) is not needed to evaluate: free it
                # first, so the run's peak is not model + metrics' sort buffers.
                del det
                gc.collect()
            trim()
            prog("evaluate", 0.0)
            maps_np = pred.maps.numpy() if pred.maps is not None else None
            masks_np = test.masks.numpy() if test.masks is not None else None
            metrics = evaluate(scores, test.labels.numpy(), test.defect_types, maps=maps_np, masks=masks_np,
                               has_mask=test.has_mask.numpy())
            curves = metrics.pop("curves", None)
            rec.update({
                "status": "ok", "metrics": metrics, "curves": curves,
                "timing": {"fit_s": round(fit_s, 3), "predict_s": round(predict_s, 3),
                           "images_per_s": round(len(test) / predict_s, 2) if predict_s > 0 else None,
                           "peak_mem_mb": peak_mb, "shared_backbone_s": round(shared_fit_s + shared_pred_s, 3)},
                "images": [{"path": p, "label": int(y), "defect_type": d, "score": float(s)}
                           for p, y, d, s in zip(test.paths, test.labels.tolist(), test.defect_types, scores,
                                                 strict=True)],
            })
            if extra:
                rec["run_notes"] = extra
            if cfg.use_cache:
                tensors = {"scores": pred.scores}
                if pred.maps is not None:
                    tensors["maps"] = pred.maps.half()
                cache.store("predictions", key, tensors, {"method": name})
                cache.store("runs", key, {}, rec)
            if save is not None:
                # float16 as the cache stores them: a saved model's colour range is the same from either path
                _save_model(save, rec, detector=det, maps=None if pred.maps is None else pred.maps.half())
            prog("done", 1.0, {})
    except Cancelled:
        raise
    except (torch.OutOfMemoryError, MemoryError) as e:
        rec["error"] = f"out of memory ({type(e).__name__}): try a smaller image size or fewer images"
    except AdlabError as e:
        rec["error"] = str(e)
    except Exception as e:  # a method's bug must not take the other methods down
        log.error("method %s failed:\n%s", name, traceback.format_exc())
        rec["error"] = f"{type(e).__name__}: {e}"
    if rec["status"] != "ok":
        progress(unit.label, "failed", None, {"error": rec["error"]})
    return rec


def _cached_record(cache: Cache, key: str, cfg: RunConfig, need_model: bool = False) -> dict[str, Any] | None:
    """A finished run's record when both it and its predictions (and its fitted model, when `need_model`) are in
    the cache and readable.

    The predictions are loaded, not just looked up: a corrupt or tampered entry is then removed and the method
    recomputed, instead of a record whose maps can no longer be shown."""
    hit = cache.load("runs", key) if cfg.use_cache else None
    if hit is None or cache.load("predictions", key) is None:
        return None
    if need_model and saved_models.cached_model_dir({"cache_key": key}, cache) is None:
        return None
    return {**hit[1], "cached": True}


def _save_model(save: tuple[Path, dict[str, Any]], rec: dict[str, Any], *, cache: Cache | None = None,
                detector: Any = None, maps: torch.Tensor | None = None) -> None:
    """Write a finished run's model to the save folder, from the fitted detector or from the cache."""
    out, results = save
    source = None
    if detector is None:
        assert cache is not None
        source = saved_models.cached_model_dir(rec, cache)
        pred = load_prediction(rec, cache)
        maps = pred.maps if pred is not None else None
    try:
        saved_models.write_model(out, rec, maps=maps, dataset=results["dataset"], config=results["config"],
                                 detector=detector, source=source)
    except OSError as e:
        raise ConfigError(f"could not save the model to {out}: {e.strerror or e}") from None


def _warm_features(det: Any, layers: tuple[str, ...], split: str, whole: ImageSet, part: ImageSet, device: str,
                   prog: Callable[..., None]) -> float:
    """Compute (or load) the shared backbone features of one split; return the backbone seconds for `part`.

    Every method that reads them is charged the backbone time of the pass that made them, as if it ran
    alone, so timings stay comparable whichever method happened to run first (or came from the cache).
    The whole split is extracted (for the test split: not the subset left after labelled anomalies are taken
    out, so runs with another K slice the same cached features instead of recomputing them). When the method
    works on tiles, the features are the tiles' (the same tile sets, hence the same cache entries, fit and
    predict use).
    """
    images, used = det.working_images(whole), det.working_images(part)
    n_whole = max(1, len(images))
    extract_features(images, layers, backbone=det.backbone, weights=det.weights, device=device,
                     progress=lambda s, f=None, i=None: prog(f"features ({split})", f, i or {}))
    secs = backbone_seconds(images, layers, backbone=det.backbone, weights=det.weights) * len(used) / n_whole
    trim()  # the pass's batches are freed: give their pages back before the next stage
    return secs


def _reads_pixels(mi: registry.MethodInfo, layers: Any) -> bool:
    """Whether a method reads the images themselves: trained ones and those without shared features do."""
    return mi.trained or not layers


def _release(sets: list[ImageSet]) -> None:
    """Release the pixels of `sets` that can be read back, then give the pages back."""
    if any([s.release() for s in sets]):
        gc.collect()
        trim()


def _feature_needs(name: str, cfg: RunConfig) -> frozenset[tuple[str, str, str]]:
    """(backbone, weights, layer) of the shared features method `name` reads in this run (empty: none)."""
    det = registry.create(name, **method_params(name, cfg))
    return frozenset((det.backbone, det.weights, layer) for layer in det.feature_layers())


def _unread_later(det: Any, layers: tuple[str, ...], sets: list[ImageSet], later: frozenset[tuple[str, str, str]],
                  action: Callable[..., None]) -> None:
    """`action` (forget or hand_over) on the in-memory features of `sets` (as `det` sees them) that no later run
    reads."""
    unread = tuple(layer for layer in layers if (det.backbone, det.weights, layer) not in later)
    for images in sets:
        action(det.working_images(images), unread, backbone=det.backbone, weights=det.weights)


def _forget_unread(det: Any, layers: tuple[str, ...], sets: list[ImageSet],
                   later: frozenset[tuple[str, str, str]]) -> None:
    """Drop the in-memory features of `sets` (as `det` sees them) that no later run reads, then trim the heap."""
    _unread_later(det, layers, sets, later, forget)
    trim()


def _tiles_used(name: str, cfg: RunConfig, shape: tuple[int, int]) -> int:
    """Tiles per image the method worked on (1: whole images); square-input methods tile non-square images."""
    det = registry.create(name).set_tiling(cfg.tile, cfg.tile_overlap)
    grid = det.tile_grid(shape)
    return 1 if grid is None else grid.n


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
