"""The whole comparison: every unsupervised method, one preset, one process, cold cache, as `adlab run` does it.

Prints, per method, the wall seconds it actually took in this run (from the end of the previous method to the
end of this one: a backbone pass is paid by the first method that needs it, later ones read it from memory),
its fit and predict seconds as recorded (the shared backbone pass charged to every method that reads it), how
its training stopped, and the image AUROC; then the total against the budget.

    python benchmarks/bench_comparison.py [DATA] [--image-size 128] [--preset fast] [--methods a,b]
        [--budget-s 100]
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
    print(f"{data} at {args.image_size} px, {args.preset} preset, cold cache, one process; threads {p.threads} "
          f"({p.why}); load average {os.getloadavg()[0]:.1f}")
    marks: list[float] = []
    t0 = time.perf_counter()

    def on_result(rec: dict) -> None:
        marks.append(time.perf_counter())
        prev = marks[-2] if len(marks) > 1 else t0
        print(f"  {rec['method']} done in {marks[-1] - prev:.1f} s ({rec['status']})", flush=True)

    res = run_methods(data, RunConfig(methods=methods, image_size=args.image_size, preset=args.preset),
                      on_result=on_result)
    total = time.perf_counter() - t0
    print(f"\n{'method':<22}{'wall s':>8}{'share':>7}{'fit s':>8}{'pred s':>8}{'backbone s':>11}{'AUROC':>7}"
          "  training")
    prev = t0
    for rec, mark in zip(res["runs"], marks, strict=True):
        t = rec.get("timing") or {}
        m = rec.get("metrics") or {}
        notes = str((rec.get("run_notes") or {}).get("training", "")).split(";")
        trained = notes[0] + (f";{notes[1]}" if len(notes) > 1 else "")
        auroc = m.get("image_auroc")

        def f(v: float | None, w: int) -> str:
            return f"{v:>{w}.1f}" if isinstance(v, int | float) else "—".rjust(w)

        print(f"{rec['method']:<22}{mark - prev:>8.1f}{(mark - prev) / total:>6.0%}{f(t.get('fit_s'), 8)}"
              f"{f(t.get('predict_s'), 8)}{f(t.get('shared_backbone_s'), 11)}"
              f"{(f'{auroc:.3f}' if auroc is not None else rec['status']):>7}  {trained}")
        prev = mark
    verdict = "within" if total <= budget else "OVER"
    print(f"\ntotal {total:.1f} s for {len(methods)} methods ({verdict} the {budget:.0f} s budget)")
    return 0 if all(r["status"] == "ok" for r in res["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
