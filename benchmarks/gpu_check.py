"""Every registered method on CUDA (mixed precision, as the engine runs it there) and on the CPU, on the sample data
and on mpdd/metal_plate: which methods fail on CUDA, and each method's CUDA-vs-CPU speed-up.

Run through `benchmarks/gpu_check.sh` (it checks for CUDA first). Directly:

    python benchmarks/gpu_check.py [--data sample_data/brick ../shared/data/mpdd/metal_plate] [--budget-s 540]
        [--methods all|a,b] [--out DIR]

Order of work: CUDA on every dataset first (failures are what this check is for), then the CPU runs for the
speed-up column until the time budget is spent; a CPU run that did not fit says so instead of a number.
Each (device, dataset) runs in its own process with its own empty cache, so nothing computed on one device
is reused by the other; the shared backbone pass is charged to every method that reads it, as `adlab run` does.
Exit status: 0 when every CUDA run succeeded, 1 when one failed or did not fit the budget or a dataset is
missing, 2 when CUDA is absent. "peak MB": the process's resident memory or CUDA's allocated peak, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _default_data() -> list[Path]:
    """The sample data, and mpdd/metal_plate from $ADLAB_DATA, ../shared/data or benchmarks/out/data (git-ignored:
    copy it there to carry it to a machine without the shared folder)."""
    roots = [Path(os.environ["ADLAB_DATA"])] if os.environ.get("ADLAB_DATA") else []
    roots += [ROOT.parent / "shared" / "data", ROOT / "benchmarks" / "out" / "data"]
    mpdd = next((r / "mpdd" / "metal_plate" for r in roots if (r / "mpdd" / "metal_plate").exists()),
                roots[0] / "mpdd" / "metal_plate")
    return [ROOT / "sample_data" / "brick", mpdd]


def child(args: argparse.Namespace) -> int:
    """Run the methods one by one on one device and dataset; one JSON line per method into args.out."""
    import torch

    from engine import registry
    from engine.runner import RunConfig, run_methods

    if args.device == "cuda":  # context creation and cuDNN loading are not any method's time
        x = torch.randn(2, 3, 64, 64, device="cuda")
        torch.nn.functional.conv2d(x, torch.randn(8, 3, 3, 3, device="cuda")).sum().item()
        torch.cuda.synchronize()
    with open(args.out, "a") as out:
        for name in args.methods.split(","):
            rec: dict = {"method": name, "device": args.device, "data": args.data}
            if time.time() > args.deadline:
                rec.update(status="skipped", error="time budget spent")
            else:
                t0 = time.perf_counter()
                try:
                    weak = registry.info(name).supervision == "weak"
                    cfg = RunConfig(methods=[name], image_size=args.image_size, device=args.device, preset="fast",
                                    labeled_anomalies=1 if weak else 0, use_cache=False)
                    r = run_methods(args.data, cfg)["runs"][0]
                    t = r.get("timing") or {}
                    rec.update(status=r["status"], error=r["error"],
                               seconds=(t.get("fit_s") or 0) + (t.get("predict_s") or 0) if r["status"] == "ok"
                               else None, peak_mem_mb=t.get("peak_mem_mb"),
                               image_auroc=(r.get("metrics") or {}).get("image_auroc"))
                except Exception as e:  # a data or config problem: say it, go on with the next method
                    rec.update(status="failed", error=f"{type(e).__name__}: {e}")
                rec["wall_s"] = round(time.perf_counter() - t0, 2)
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(f"  [{args.device}] {name}: {rec['status']}"
                  + (f" {rec.get('seconds', 0):.1f} s" if rec["status"] == "ok" else f" ({rec.get('error')})"),
                  flush=True)
    return 0


def _run_child(device: str, data: Path, methods: list[str], deadline: float, out: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix=f"adlab-gpu-check-{device}-") as cache:
        env["ADLAB_CACHE"] = cache
        cmd = [sys.executable, __file__, "--child", "--device", device, "--data-one", str(data),
               "--methods", ",".join(methods), "--deadline", str(deadline), "--out", str(out)]
        try:
            subprocess.run(cmd, env=env, cwd=ROOT, timeout=max(30.0, deadline - time.time() + 120))
        except subprocess.TimeoutExpired:
            print(f"  [{device}] {data.name}: killed after the time budget", flush=True)


def _table(recs: list[dict], data: Path, methods: list[str]) -> list[str]:
    by = {(r["method"], r["device"]): r for r in recs if r["data"] == str(data)}
    lines = [f"\n{data} (fast preset, fit + predict seconds, shared backbone pass charged to each method)",
             f"{'method':<22}{'CUDA s':>8}{'CPU s':>8}{'speed-up':>10}{'AUROC cuda':>12}{'AUROC cpu':>11}"
             f"{'peak MB':>9}  CUDA status"]
    for m in methods:
        g, c = by.get((m, "cuda"), {}), by.get((m, "cpu"), {})
        gs, cs = g.get("seconds"), c.get("seconds")
        speed = f"{cs / gs:.1f}×" if gs and cs else "—"

        def num(v: float | None, fmt: str) -> str:
            return format(v, fmt) if isinstance(v, int | float) else "—".rjust(int(fmt.split(".")[0]))

        status = g.get("status", "not run")
        if status != "ok":
            status = status.upper() + (f": {g['error']}" if g.get("error") else "")
        if c.get("status") not in (None, "ok"):
            status += f"; CPU {c['status']}" + (f": {c.get('error')}" if c.get("status") != "skipped" else "")
        lines.append(f"{m:<22}{num(gs, '8.1f')}{num(cs, '8.1f')}{speed:>10}{num(g.get('image_auroc'), '12.3f')}"
                     f"{num(c.get('image_auroc'), '11.3f')}{num(g.get('peak_mem_mb'), '9.0f')}  {status}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="*", type=Path, default=None)
    ap.add_argument("--methods", default="all")
    ap.add_argument("--image-size", type=int, default=None, help="default: 256, or the images' own size if smaller")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget for all runs")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_check.jsonl (default: a temp folder)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--data-one", dest="data_one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        args.data = args.data_one
        return child(args)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (torch.cuda.is_available() is False); nothing was run.",
              file=sys.stderr)
        return 2
    from engine import registry

    start = time.time()
    deadline = start + args.budget_s
    methods = [m.name for m in registry.available()] if args.methods == "all" else args.methods.split(",")
    for m in methods:
        registry.info(m)  # an unknown name fails here, with the list of known ones, before anything runs
    props = torch.cuda.get_device_properties(0)
    amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    print(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}; autocast {amp}; CPU threads for the CPU runs: {torch.get_num_threads()}")
    args.data = args.data or _default_data()
    data = []
    for d in args.data:
        if d.exists():
            data.append(d)
        else:
            print(f"MISSING dataset {d}: skipped (copy it there or pass --data)", file=sys.stderr)
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="adlab-gpu-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / "gpu_check.jsonl"
    jsonl.unlink(missing_ok=True)
    for device in ("cuda", "cpu"):
        for d in data:
            print(f"{device} on {d} ({time.time() - start:.0f} s elapsed)", flush=True)
            _run_child(device, d, methods, deadline, jsonl)
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    for d in data:
        print("\n".join(_table(recs, d, methods)))
    failed = [f"{r['method']} on {Path(r['data']).name}" for r in recs if r["device"] == "cuda"
              and r["status"] not in ("ok", "skipped")]
    not_run = [f"{m} on {d.name}" for d in data for m in methods
               if not any(r["device"] == "cuda" and r["method"] == m and r["data"] == str(d)
                          and r["status"] != "skipped" for r in recs)]
    print(f"\ntotal {time.time() - start:.0f} s; results: {jsonl}")
    if failed:
        print(f"CUDA FAILURES: {', '.join(failed)}")
    if not_run:
        print(f"NOT RUN ON CUDA (budget): {', '.join(not_run)}")
    return 1 if failed or not_run or len(data) < len(args.data) else 0


if __name__ == "__main__":
    raise SystemExit(main())
