"""The same sweep on the local executor and on a local Ray runtime, side by side: wall times and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sweep.py [--size 64] [--seeds 0,1] [--cpus 2] \
        [--methods padim,patchcore,autoencoder] [DATA ...]

Default: the three sample categories × padim, patchcore, autoencoder (2 epochs) × seeds 0,1 at 64 px. Each
executor gets a fresh cache, so every unit is computed; the local executor runs units one at a time with one
torch thread each (what one Ray CPU slot gets), Ray runs `--cpus` units at once. Also checks that both give
identical metrics. Prints seconds for Ray's start-up, each sweep, and local / Ray.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.executors import LocalExecutor, RayExecutor  # noqa: E402
from engine.sweep import SweepConfig, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="*", default=[str(ROOT / "sample_data" / c) for c in ("brick", "grass", "gravel")])
    ap.add_argument("--methods", default="padim,patchcore,autoencoder")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--preset", default="test")
    args = ap.parse_args()
    methods = args.methods.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))

    def cfg(cache: str) -> SweepConfig:
        return SweepConfig(datasets=args.data, methods=methods, seeds=[int(s) for s in args.seeds.split(",")],
                           preset=args.preset, image_size=args.size, cache_root=cache, threads_per_unit=1,
                           params={"autoencoder": {"epochs": 2}} if "autoencoder" in methods else {})

    t0 = time.perf_counter()
    local = run_sweep(cfg(str(tmp / "c-local")), tmp / "local", LocalExecutor())
    t_local = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = RayExecutor(num_cpus=args.cpus)
    t_start = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        remote = run_sweep(cfg(str(tmp / "c-ray")), tmp / "ray", ex)
        t_ray = time.perf_counter() - t0
    finally:
        ex.close()
    same = [u["metrics"] for u in local["units"]] == [u["metrics"] for u in remote["units"]]
    n = len(local["units"])
    print(f"{n} units ({len(args.data)} datasets × {len(methods)} methods × {len(args.seeds.split(','))} seeds, "
          f"{args.size} px)")
    print(f"local executor (1 unit at a time, 1 thread): {t_local:.1f} s")
    print(f"ray ({args.cpus} CPUs, {ex.slots} units at once): start-up {t_start:.1f} s + sweep {t_ray:.1f} s")
    print(f"local / ray (sweep only): {t_local / t_ray:.2f}x · local / ray (with start-up): "
          f"{t_local / (t_ray + t_start):.2f}x · identical metrics: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
