"""Several methods of one run at once: the methods are split into groups, each group runs in its own worker
process (`engine.worker`), and the records come back as one results dict, the same as `run_methods` returns.

Why: the from-scratch methods train small networks, which use several cores poorly (a step's operations are
small, and the Python between them runs on one core), so on a machine with more than one core two methods at
one thread each finish sooner than the same two one after the other at two threads each. Each worker is granted
an equal share of the CPUs (`ADLAB_THREADS`); the features of the shared backbone pass are computed once and read
by the other workers from the disk cache (the cache's inter-process lock); a method that fails, or a worker that
dies, fails only the methods of its own group.

The groups are balanced with the time estimates of earlier runs on this machine (`engine.estimates`), longest
first; a method never measured here counts what it took on a reference machine (`PRIOR_FAST_S`). Each
group then runs its cheapest methods first: the total is the same, and the first records (the memory-bank
methods, seconds each) arrive at once instead of after the trained ones ahead of them in the list.
Results differ from a one-process run only where the thread count changes them (a trained method's float sums
run in another order at 1 thread than at 2; `ADLAB_THREADS` fixes the count either way).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine.api import AdlabError

RunProgress = Callable[[str, str, float | None, dict[str, Any]], None]

# Seconds a method never measured here is taken to cost when the groups are balanced: only the ratios matter.
# Own seconds of each unsupervised method in the fast preset on mpdd/metal_plate (41 training, 110 test images) at
# 128 and 256 px, one thread per worker (benchmarks/bench_comparison.py --jobs 2, 2-core Xeon, session 11). At
# other sides a method's seconds follow the power of the side that its two points give (the methods that resize
# to a working size of their own barely change). Balancing a cold cache by these instead of one figure for every
# trained method: the longer group of that run would have ended 535 s instead of 596 s (256 px).
PRIOR_FAST_S: dict[str, tuple[float, float]] = {
    "efficient_ad": (21.9, 75.5), "reverse_distillation": (7.1, 25.0), "stfpm": (21.6, 82.2),
    "uninformed_students": (58.8, 211.8), "deep_svdd": (3.6, 12.1), "fcdd": (3.4, 11.4), "patch_svdd": (31.0, 29.5),
    "cflow": (9.1, 32.0), "cs_flow": (25.9, 60.6), "fastflow": (9.8, 32.4), "cfa": (1.5, 9.7), "gcpf": (3.0, 13.0),
    "padim": (2.5, 12.8), "patchcore": (0.5, 1.7), "spade": (2.2, 7.2), "autoencoder": (30.1, 29.0),
    "dfr": (22.0, 88.2), "draem": (70.7, 66.8), "memae": (53.7, 58.7), "skip_ae": (65.7, 63.0), "vae": (37.7, 33.4),
    "ganomaly": (43.0, 43.1), "uniad": (71.2, 70.8),
}
PRIOR_TRAINED_S = 20.0  # any other method at 128 px (the quality preset, weakly supervised methods), ~ side²
PRIOR_OTHER_S = 2.0


def prior_seconds(name: str, trained: bool, side: int, preset: str) -> float:
    """A guess of the seconds `name` takes at `side` px in `preset`, for balancing only (never shown as a time)."""
    ref = PRIOR_FAST_S.get(name) if preset != "quality" else None
    if ref is None:
        return (PRIOR_TRAINED_S if trained else PRIOR_OTHER_S) * (side / 128) ** 2
    at128, at256 = ref
    return at128 * (side / 128) ** math.log2(at256 / at128)


def balance(costs: Sequence[tuple[str, float]], groups: int) -> list[list[str]]:
    """Split (name, seconds) into at most `groups` non-empty groups of near-equal total seconds.

    Longest first, each to the group with the least total so far (ties: the lower group); each group is in the
    order it should run: cheapest first, equal costs in the given order. Returns [[name, ...], ...] in group order.
    """
    if groups < 1:
        raise ValueError(f"groups must be ≥ 1, got {groups}")
    order = {name: i for i, (name, _) in enumerate(costs)}
    bins: list[list[str]] = [[] for _ in range(min(groups, len(costs)))]
    totals = [0.0] * len(bins)
    for name, secs in sorted(costs, key=lambda c: (-c[1], order[c[0]])):
        g = min(range(len(bins)), key=lambda i: (totals[i], i))
        bins[g].append(name)
        totals[g] += max(0.0, secs)
    cost = dict(costs)
    return [sorted(b, key=lambda name: (cost[name], order[name])) for b in bins if b]


def method_costs(cfg: Any, n_train: int, n_test: int, shape: tuple[int, int], device: str) -> list[tuple[str, float]]:
    """(method, estimated seconds) for every method of `cfg`, from this machine's earlier runs when there are
    some (`engine.estimates`), else `prior_seconds`; weak methods are counted once per K."""
    from engine import estimates, registry
    from engine.runner import method_params

    measured = estimates.load()
    n_k = len(cfg.ks) if cfg.only_k is None else 1
    out = []
    for name in cfg.methods:
        mi = registry.info(name)
        est = estimates.estimate_method(name, method_params(name, cfg), trained=mi.trained, n_train=n_train,
                                        n_test=n_test, image_size=min(shape), preset=cfg.preset, device=device,
                                        measurements=measured, shape=shape, tile=cfg.tile,
                                        overlap=cfg.tile_overlap)
        secs = est.seconds if est.seconds is not None else prior_seconds(name, mi.trained, min(shape), cfg.preset)
        out.append((name, secs * (n_k if mi.supervision == "weak" else 1)))
    return out


def run_parallel(data: str | Path, cfg: Any, jobs: int, *, progress: RunProgress | None = None,
                 cancel: threading.Event | None = None,
                 on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`run_methods(data, cfg)` with up to `jobs` methods running at once, each group in a worker process.

    `progress` and `on_result` are called from the threads that follow the workers, one call at a time.
    Configuration and data errors are raised before any worker starts (as `run_methods` raises them); a worker
    that fails or dies turns the methods of its group that had not finished into failed records. Raises
    `Cancelled` when `cancel` was set.
    """
    from engine.data import discover
    from engine.device import resolve_device
    from engine.runner import Cancelled, check_run_config, failed_record, run_label, run_plan
    from engine.threads import available_cpus
    from engine.worker import WorkerStats, run_in_worker

    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    check_run_config(cfg)
    ds = discover(data)  # a bad dataset is reported here, once, not by every worker
    shape = ds.working_shape(cfg.image_size, cfg.resize, cfg.tile)
    groups = balance(method_costs(cfg, len(ds.train), len(ds.test), shape, resolve_device(cfg.device)), jobs)
    threads = max(1, available_cpus() // len(groups))
    lock = threading.Lock()
    records: dict[str, dict[str, Any]] = {}
    headers: list[dict[str, Any]] = []
    failures: list[tuple[list[str], BaseException]] = []

    def report(rec: dict[str, Any]) -> None:
        with lock:
            records[rec.get("label") or rec["method"]] = rec
            if on_result is not None:
                on_result(rec)

    def prog(method: str, stage: str, fraction: float | None, info: dict[str, Any]) -> None:
        if progress is not None:
            with lock:
                progress(method, stage, fraction, info)

    def follow(group: list[str]) -> None:
        try:
            res = run_in_worker(data, replace(cfg, methods=group), progress=prog, cancel=cancel, on_result=report,
                                stats=WorkerStats(), label=",".join(group), threads=threads)
            with lock:
                headers.append({k: v for k, v in res.items() if k != "runs"})
        except BaseException as e:  # noqa: BLE001 - recorded for the group, re-raised below when it is a cancel
            with lock:
                failures.append((group, e))

    followers = [threading.Thread(target=follow, args=(g,), name=f"adlab-group-{i}", daemon=True)
                 for i, g in enumerate(groups)]
    for t in followers:
        t.start()
    for t in followers:
        t.join()
    if any(isinstance(e, Cancelled) for _, e in failures):
        raise Cancelled("run cancelled")
    if not headers:  # no worker finished: the same error for all, or the first one
        raise failures[0][1]
    results = {**headers[0], "runs": []}
    why = {m: e for g, e in failures for m in g}
    several = len(cfg.ks) > 1
    for name, k in run_plan(cfg):
        label = run_label(name, k, several)
        rec = records.get(label)
        if rec is None:
            err = why.get(name)
            msg = (str(err) if isinstance(err, AdlabError) else f"{type(err).__name__}: {err}" if err is not None
                   else "it ended without reporting this method")
            rec = failed_record(name, cfg, label, k, f"the worker running it stopped: {msg}")
            if on_result is not None:
                on_result(rec)
        results["runs"].append(rec)
    return results
