"""Square vs keep-aspect vs tiled (issue 17): image/pixel AUROC and seconds per method on real datasets.

Each geometry is one `run_methods` call (fast preset, one cache folder per dataset so the methods of one call
share their backbone features; every method is charged its backbone time as if it ran alone). On square data
keep-aspect is the same run as square (same shape, same cache key) and is reported as such, not rerun.

    python benchmarks/bench_aspect.py DATA [DATA ...] --methods patchcore,padim,stfpm --tile 256 \
        [--tile-image-size N] [--tile-overlap 0.25] [--out bench-aspect.json]

`--tile` is the tile side of the tiled run (at the images' native resolution, or at --tile-image-size).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cache import Cache  # noqa: E402
from engine.data import discover  # noqa: E402
from engine.runner import RunConfig, run_methods  # noqa: E402


def _row(data: str, mode: str, res: dict, wall: float) -> list[dict]:
    c = res["config"]
    rows = []
    for r in res["runs"]:
        m, t = r.get("metrics") or {}, r.get("timing") or {}
        rows.append({"data": data, "mode": mode, "shape": c["image_shape"], "tiles": r.get("tiles_per_image", 1),
                     "method": r["method"], "status": r["status"], "error": r.get("error"),
                     "image_auroc": m.get("image_auroc"), "pixel_auroc": m.get("pixel_auroc"),
                     "pixel_aupro": m.get("pixel_aupro"), "fit_s": t.get("fit_s"), "predict_s": t.get("predict_s"),
                     "peak_mem_mb": t.get("peak_mem_mb"), "call_wall_s": round(wall, 1)})
    return rows


def _fmt(v: object) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+")
    ap.add_argument("--methods", default="patchcore,padim,stfpm")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--tile-image-size", type=int, default=None)
    ap.add_argument("--tile-overlap", type=float, default=0.25)
    ap.add_argument("--modes", default="square,keep-aspect,tiled")
    ap.add_argument("--out", default="bench-aspect.json")
    args = ap.parse_args()
    methods = args.methods.split(",")
    rows: list[dict] = []
    for data in args.data:
        ds = discover(data)
        summary = ds.size_summary()
        square_data = summary is None or summary.square
        with tempfile.TemporaryDirectory(prefix="bench-aspect-") as tmp:
            cache = Cache(Path(tmp))
            for mode in args.modes.split(","):
                if mode == "keep-aspect" and square_data:
                    rows += [{**r, "mode": "keep-aspect (= square: square data)"} for r in rows
                             if r["data"] == Path(data).name and r["mode"] == "square"]
                    continue
                cfg = RunConfig(methods=methods, image_size=args.image_size, resize="square", preset="fast")
                if mode == "keep-aspect":
                    cfg.resize = "keep-aspect"
                elif mode == "tiled":
                    cfg.resize, cfg.tile, cfg.tile_overlap = "keep-aspect", args.tile, args.tile_overlap
                    cfg.image_size = args.tile_image_size
                t0 = time.perf_counter()
                res = run_methods(ds, cfg, cache=cache)
                new = _row(Path(data).name, mode, res, time.perf_counter() - t0)
                rows += new
                for r in new:
                    print(" | ".join(_fmt(r[k]) for k in ("data", "mode", "shape", "tiles", "method", "status",
                                                          "image_auroc", "pixel_auroc", "fit_s", "predict_s",
                                                          "peak_mem_mb")), flush=True)
                Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
