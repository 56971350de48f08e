"""Time and memory estimates of a run, from measurements of earlier runs on this machine.

After each method that really ran (not one returned from the cache) `record` stores what it cost: fit and
predict seconds, the backbone seconds inside them, the process's peak resident memory and its memory before the
run started, with the run's size (train and test image counts, image size, parameters, preset, device). They
live in one small JSON file, ``<cache root>/estimates.json``, a few measurements per method and device.

`estimate` scales the closest measurement of each method to a new run:
- memory: above the process's starting memory, a fixed part plus a part growing with the pixels held,
  (n_train + n_test) x size²: fitted to the method's measurements at two or more sizes, else the growing part is
  taken at most `PRIOR_BYTES_PER_PIXEL` and the rest of one measurement as fixed;
- backbone seconds grow with the same pixels;
- fit seconds (without the backbone) grow with the optimiser steps x batch x working pixels for methods that
  train a network (the presets cap the steps, so more images do not mean longer training past the cap), and
  with n_train x working pixels for the others; predict seconds with n_test x working pixels.
Non-square and tiled runs (issue 17) are counted in work units: a method that sees T tiles of t px per image is
costed as T x (n_train + n_test) images of t² pixels, and an H x W image as a square of the same pixel count.
A method never measured here gets no time estimate (the page says so) and a deliberately generous memory prior,
so a job is never refused on a guess that is too low. A job's memory is the largest of its methods' (they run one
after another); its time is the sum, with the backbone pass counted once (the methods share its features). A job
whose methods run N at once (`engine.parallel`) needs the N largest peaks together and takes its longest group.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.cache import atomic_write
from engine.data import cache_root
from engine.data.geometry import DEFAULT_OVERLAP, work_units

log = logging.getLogger("adlab.estimates")

FILE_NAME = "estimates.json"
KEEP = 8  # measurements kept per (method, device), the newest
DEFAULT_MEMORY_SHARE = 0.6  # of the machine's memory, for one job, when ADLAB_JOB_MEMORY_GB is not set
PRIOR_BASE_MB = 900.0  # a fresh worker with torch, timm and the engine imported, before any data (measured ~730)
# Memory per image pixel above the base that grows with the data: an upper bound on what was measured here at
# scale (PaDiM, 151 images at 256 px: ~200 B/px). A small run's memory is mostly fixed costs (networks, buffers);
# scaled up as if it all grew with the data it would refuse jobs that fit, so the growing part is capped at this.
PRIOR_BYTES_PER_PIXEL = 300.0


@dataclass(frozen=True)
class MethodEstimate:
    """Expected cost of one method in a run. `seconds` is None when the method was never measured here."""

    method: str
    seconds: float | None
    backbone_s: float  # the part of `seconds` spent in the shared backbone pass
    peak_mb: float
    measured: bool  # False: the memory is the generous prior, and there is no time
    basis: str  # what it was scaled from, in words


@dataclass(frozen=True)
class JobEstimate:
    """Expected cost of a whole run and the memory one job may use here."""

    methods: list[MethodEstimate]
    seconds: float | None  # None when no method was measured; else the measured methods' total
    peak_mb: float
    limit_mb: float
    n_images: int
    image_size: int
    shape: tuple[int, int] | None = None  # (H, W) when not image_size square
    tiles: int = 1  # tiles per image
    tile_side: int = 0  # their side in px

    @property
    def size_text(self) -> str:
        """'256 px', '256×640 px' or '512×512 px in 9 tiles each'."""
        h, w = self.shape or (self.image_size, self.image_size)
        text = f"{self.image_size} px" if h == w and self.shape is None else f"{h}×{w} px"
        return text + (f" in {self.tiles} tiles of {self.tile_side} px each" if self.tiles > 1 else "")

    @property
    def unmeasured(self) -> list[str]:
        """Methods without a measurement on this machine."""
        return [m.method for m in self.methods if not m.measured]

    def refusal(self) -> str | None:
        """A clear message when the run would need more memory than a job may use, else None."""
        if self.peak_mb <= self.limit_mb:
            return None
        worst = max(self.methods, key=lambda m: m.peak_mb)
        how = ("measured on earlier runs here" if worst.measured
               else "not measured on this machine yet, so a generous guess")
        return (f"This run would need about {gb_text(self.peak_mb)} of memory ({worst.method} on "
                f"{self.n_images} images at {self.size_text}; {how}), more than the "
                f"{gb_text(self.limit_mb)} one training job may use on this machine (ADLAB_JOB_MEMORY_GB). "
                "Try a smaller image size, fewer images or fewer methods.")


def job_memory_limit_mb() -> float:
    """The memory one job may use: ``$ADLAB_JOB_MEMORY_GB``, else a safe share of the machine's (or container's)."""
    env = os.environ.get("ADLAB_JOB_MEMORY_GB")
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise ValueError(f"ADLAB_JOB_MEMORY_GB={env!r} is not a number of gigabytes") from None
        if not gb > 0:
            raise ValueError(f"ADLAB_JOB_MEMORY_GB={env!r} must be above 0")
        return gb * 1024
    return DEFAULT_MEMORY_SHARE * machine_memory_mb()


def machine_memory_mb() -> float:
    """Physical memory, or the cgroup's limit when a container sets a lower one."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        raw = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if raw.isdigit():
            total = min(total, int(raw))
    except OSError:
        pass
    return total / 2**20


# ------------------------------------------------------------------------------------------------ storage


def _path() -> Path:
    return cache_root() / FILE_NAME


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write of the file between processes (the dashboard's workers, CLI runs)."""
    p = _path()
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load() -> dict[str, list[dict[str, Any]]]:
    """Stored measurements, {"<method>|<device>": [newest last]}; empty when missing or unreadable."""
    try:
        data = json.loads(_path().read_text())
        ms = data.get("measurements", {})
        return ms if isinstance(ms, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as e:
        log.warning("ignoring unreadable estimates %s: %s", _path(), e)
        return {}


def units(n_train: int, n_test: int, image_size: float, shape: tuple[int, int] | None = None,
          tile: int | None = None, overlap: float = DEFAULT_OVERLAP) -> tuple[int, int, float]:
    """(train units, test units, side of a unit): what a method sees, in square images (module notes)."""
    if shape is None and tile is None:
        return n_train, n_test, float(image_size)
    per, side = work_units(shape or (int(image_size), int(image_size)), tile, overlap)
    return n_train * per, n_test * per, side


def record(rec: dict[str, Any], *, n_train: int, n_test: int, image_size: int, preset: str, device: str,
           base_mb: float, shape: tuple[int, int] | None = None, tile: int | None = None,
           overlap: float = DEFAULT_OVERLAP) -> None:
    """Store the cost of one finished run record (status ok, not from the cache); others are ignored. `shape`
    (H, W) and `tile`: the run's working geometry, stored as work units (see `units`)."""
    t = rec.get("timing") or {}
    if rec.get("status") != "ok" or rec.get("cached") or t.get("fit_s") is None or t.get("peak_mem_mb") is None:
        return
    n_train, n_test, side = units(n_train, n_test, image_size, shape, tile, overlap)
    m = {"n_train": int(n_train), "n_test": int(n_test), "image_size": round(side, 2), "preset": preset,
         "params": rec.get("params") or {}, "fit_s": float(t["fit_s"]), "predict_s": float(t.get("predict_s") or 0),
         "backbone_s": float(t.get("shared_backbone_s") or 0), "peak_mb": float(t["peak_mem_mb"]),
         "base_mb": float(base_mb), "when": time.time()}
    key = f"{rec['method']}|{device}"
    with _locked():
        ms = load()
        ms[key] = [*ms.get(key, []), m][-KEEP:]
        atomic_write(_path(), json.dumps({"version": 1, "measurements": ms}, indent=1).encode())


# ------------------------------------------------------------------------------------------------- model


def _steps(params: dict[str, Any], n_train: int) -> int | None:
    """Optimiser steps of a gradient-trained method (None when its parameters do not say)."""
    from engine.components.train_loop import batches_per_epoch

    epochs, bs = params.get("epochs"), params.get("batch_size")
    if not isinstance(epochs, int) or not isinstance(bs, int):
        return None
    per_epoch = params.get("steps_per_epoch") or batches_per_epoch(n_train, bs)
    steps = epochs * int(per_epoch)
    cap = params.get("max_steps")
    return min(steps, int(cap)) if isinstance(cap, int) else steps


def _work_px(params: dict[str, Any], image_size: float) -> float:
    """Pixels a method works on per image: its own fixed resolution (`size`) when it has one."""
    s = params.get("size")
    return float(s if isinstance(s, int) and s > 0 else image_size) ** 2


def _fit_work(params: dict[str, Any], n_train: int, image_size: float, trained: bool) -> float:
    steps = _steps(params, n_train) if trained else None
    count = steps * int(params["batch_size"]) if steps is not None else n_train
    return max(1, count) * _work_px(params, image_size)


def _closest(ms: list[dict[str, Any]], n: int, size: float, preset: str) -> dict[str, Any]:
    def distance(m: dict[str, Any]) -> tuple[float, float]:
        d = abs(math.log(max(1, n) / max(1, m["n_train"] + m["n_test"]))) + 2 * abs(math.log(size / m["image_size"]))
        return d + (0 if m.get("preset") == preset else 1.0), -m.get("when", 0)

    return min(ms, key=distance)


def estimate_method(method: str, params: dict[str, Any], *, trained: bool, n_train: int, n_test: int,
                    image_size: float, preset: str, device: str,
                    measurements: dict[str, list[dict[str, Any]]] | None = None,
                    shape: tuple[int, int] | None = None, tile: int | None = None,
                    overlap: float = DEFAULT_OVERLAP) -> MethodEstimate:
    """Scale the closest stored measurement of `method` on `device` to this run (see the module's notes).
    `shape` (H, W) and `tile`: a non-square or tiled run, costed in work units (`units`)."""
    n_train, n_test, image_size = units(n_train, n_test, image_size, shape, tile, overlap)
    ms = (load() if measurements is None else measurements).get(f"{method}|{device}") or []
    n = n_train + n_test
    if not ms:
        peak = PRIOR_BASE_MB + PRIOR_BYTES_PER_PIXEL * n * image_size**2 / 2**20
        return MethodEstimate(method, None, 0.0, peak, False, "not measured on this machine yet")
    m = _closest(ms, n, image_size, preset)
    m_n = m["n_train"] + m["n_test"]
    px_ratio = (n * image_size**2) / (m_n * m["image_size"] ** 2)
    fixed_mb, mb_per_px = _memory_line([x for x in ms if x.get("preset") == m.get("preset")])
    peak = m["base_mb"] + fixed_mb + mb_per_px * n * image_size**2
    bb_train = m["backbone_s"] * m["n_train"] / m_n
    fit_core = max(0.0, m["fit_s"] - bb_train)
    pred_core = max(0.0, m["predict_s"] - (m["backbone_s"] - bb_train))
    fit_ratio = (_fit_work(params, n_train, image_size, trained)
                 / _fit_work(m["params"], m["n_train"], m["image_size"], trained))
    pred_ratio = (max(1, n_test) * _work_px(params, image_size)) / (max(1, m["n_test"])
                                                                     * _work_px(m["params"], m["image_size"]))
    backbone = m["backbone_s"] * px_ratio
    seconds = fit_core * fit_ratio + pred_core * pred_ratio + backbone
    basis = f"measured on {m_n} images at {m['image_size']:g} px ({m.get('preset')} preset)"
    return MethodEstimate(method, seconds, backbone, peak, True, basis)


def _memory_line(ms: list[dict[str, Any]]) -> tuple[float, float]:
    """(fixed MB, MB per image pixel) of the memory above the base, from measurements of one method."""
    px = [(m["n_train"] + m["n_test"]) * m["image_size"] ** 2 for m in ms]
    var = [max(0.0, m["peak_mb"] - m["base_mb"]) for m in ms]
    cap = PRIOR_BYTES_PER_PIXEL / 2**20
    if len(set(px)) >= 2 and max(px) >= 1.5 * min(px):  # a least-squares line through them
        mx, my = sum(px) / len(px), sum(var) / len(var)
        slope = sum((x - mx) * (y - my) for x, y in zip(px, var, strict=True)) / sum((x - mx) ** 2 for x in px)
        slope = max(0.0, slope)
        return max(0.0, my - slope * mx), slope
    i = max(range(len(px)), key=px.__getitem__)  # the largest run says the most about growth
    slope = min(var[i] / px[i], cap)
    return var[i] - slope * px[i], slope


def estimate_job(methods: list[tuple[str, dict[str, Any], bool]], *, n_train: int, n_test: int, image_size: int,
                 preset: str, device: str, shape: tuple[int, int] | None = None, tile: int | None = None,
                 overlap: float = DEFAULT_OVERLAP, workers: int = 1) -> JobEstimate:
    """Estimate a run of `methods` given as (name, full parameters, trained by gradient); `shape` (H, W) and
    `tile` for a non-square or tiled run. `workers` > 1: the methods run that many at once in worker processes
    (`engine.parallel`): the time is the longest group's, the memory the `workers` largest peaks together."""
    stored = load()
    ests = [estimate_method(name, params, trained=trained, n_train=n_train, n_test=n_test, image_size=image_size,
                            preset=preset, device=device, measurements=stored, shape=shape, tile=tile,
                            overlap=overlap) for name, params, trained in methods]
    timed = [e for e in ests if e.seconds is not None]
    # The methods share one backbone pass: count its time once (the largest), not once per method.
    own = [(str(i), e.seconds - e.backbone_s) for i, e in enumerate(timed) if e.seconds is not None]
    if workers > 1 and own:
        from engine.parallel import balance

        cost = dict(own)
        longest = max(sum(cost[i] for i in g) for g in balance(own, workers))
    else:
        longest = sum(secs for _, secs in own)
    seconds = longest + max((e.backbone_s for e in timed), default=0.0) if timed else None
    peaks = sorted((e.peak_mb for e in ests), reverse=True)
    return JobEstimate(methods=ests, seconds=seconds, peak_mb=sum(peaks[:max(1, workers)]),
                       limit_mb=job_memory_limit_mb(), n_images=n_train + n_test, image_size=image_size,
                       shape=shape, tiles=1 if shape is None else work_units(shape, tile, overlap)[0],
                       tile_side=0 if shape is None else int(work_units(shape, tile, overlap)[1]))


def gb_text(mb: float) -> str:
    """Megabytes as gigabytes with three significant digits: '0.05 GB', '1.23 GB', '14.4 GB'."""
    return f"{mb / 1024:.3g} GB"


def duration_text(seconds: float | None) -> str:
    """'≈ 40 s', '≈ 6 min', '≈ 1.5 h'; 'unknown' for None."""
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"≈ {max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"≈ {round(seconds / 60)} min"
    return f"≈ {seconds / 3600:.1f} h"
