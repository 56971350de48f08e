"""The whole comparison: every unsupervised method, one preset, one process, cold cache, as `adlab run` does it.

Prints, per method, its own seconds (fit + predict as recorded, the shared backbone pass counted once, for the
first method that read it), its fit and predict seconds as recorded (the backbone pass charged to every method
that reads it), when its record arrived, how its training stopped, and the image AUROC; then the total wall time
against the budget. `--jobs N` runs the methods N at once in worker processes (`engine.parallel`), as
`adlab run --jobs N` does.

    python benchmarks/bench_comparison.py [DATA] [--image-size 128] [--preset fast] [--methods a,b]
        [--budget-s 100] [--jobs 2]
Without DATA: ../shared/data/mpdd/metal_plate when present (41 training images), else sample_data/brick.
Issue 18's budgets: a 40-image set at 128 px in ≤ 100 s, mpdd/metal_plate at 256 px in ≤ 600 s (2 CPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", default=None)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--preset", default="fast", choices=["fast", "quality"])
    ap.add_argument("--methods", default="all", help="default: every method that needs no labelled anomalies")
    ap.add_argument("--budget-s", type=float, default=None, help="default: 100 at ≤ 128 px, else 600")
    ap.add_argument("--jobs", type=int, default=1, help="methods at once, each group in a worker (engine.parallel)")
    args = ap.parse_args()
    os.environ["ADLAB_CACHE"] = tempfile.mkdtemp(prefix="adlab-bench-comparison-")  # cold: nothing cached
    from engine import registry
    from engine.runner import RunConfig, run_methods
    from engine.threads import plan

    mpdd = ROOT.parent / "shared" / "data" / "mpdd" / "metal_plate"
    data = args.data or str(mpdd if mpdd.exists() else ROOT / "sample_data" / "brick")
    methods = ([m.name for m in registry.available() if m.supervision == "none"] if args.methods == "all"
               else args.methods.split(","))
    budget = args.budget_s or (100.0 if args.image_size <= 128 else 600.0)
    p = plan()
    how = (f"{args.jobs} worker processes at once, {max(1, p.cpus // args.jobs)} threads each" if args.jobs > 1
           else f"one process, threads {p.threads} ({p.why})")
    print(f"{data} at {args.image_size} px, {args.preset} preset, cold cache, {how}; "
          f"load average {os.getloadavg()[0]:.1f}")
    done_at: dict[str, float] = {}  # run label -> seconds since the start when its record arrived
    t0 = time.perf_counter()

    def on_result(rec: dict) -> None:
        now = time.perf_counter() - t0
        prev = max(done_at.values(), default=0.0)
        done_at[rec.get("label") or rec["method"]] = now
        print(f"  {rec['method']} done at {now:.1f} s (+{now - prev:.1f}) ({rec['status']})", flush=True)

    cfg = RunConfig(methods=methods, image_size=args.image_size, preset=args.preset)
    if args.jobs > 1:
        from engine.parallel import run_parallel

        res = run_parallel(data, cfg, args.jobs, on_result=on_result)
    else:
        res = run_methods(data, cfg, on_result=on_result)
    total = time.perf_counter() - t0
    # "own s": fit + predict as the run recorded them, the shared backbone pass counted once (by the first method
    # that read it); with one process it is the method's share of the wall time.
    print(f"\n{'method':<22}{'own s':>8}{'share':>7}{'fit s':>8}{'pred s':>8}{'backbone s':>11}{'done at':>9}"
          f"{'AUROC':>7}  training")
    seen_backbone = False
    for rec in res["runs"]:
        t = rec.get("timing") or {}
        m = rec.get("metrics") or {}
        notes = str((rec.get("run_notes") or {}).get("training", "")).split(";")
        trained = notes[0] + (f";{notes[1]}" if len(notes) > 1 else "")
        auroc = m.get("image_auroc")
        bb = t.get("shared_backbone_s") or 0.0
        own = (t.get("fit_s") or 0.0) + (t.get("predict_s") or 0.0) - (bb if seen_backbone else 0.0)
        seen_backbone = seen_backbone or bb > 0

        def f(v: float | None, w: int) -> str:
            return f"{v:>{w}.1f}" if isinstance(v, int | float) else "—".rjust(w)

        print(f"{rec['method']:<22}{own:>8.1f}{own / total:>6.0%}{f(t.get('fit_s'), 8)}"
              f"{f(t.get('predict_s'), 8)}{f(t.get('shared_backbone_s'), 11)}"
              f"{f(done_at.get(rec.get('label') or rec['method']), 9)}"
              f"{(f'{auroc:.3f}' if auroc is not None else rec['status']):>7}  {trained}")
    verdict = "within" if total <= budget else "OVER"
    print(f"\ntotal {total:.1f} s for {len(methods)} methods ({verdict} the {budget:.0f} s budget)")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
