"""Does the dashboard server still grow while a job trains? Server and worker memory, thread vs process jobs.

For each isolation ("thread": the job trains inside the server process, as before; "process": in a worker), a
fresh Python process plays the server: it imports the dashboard's services, validates the dataset (idle size),
then trains one job through the JobManager while sampling its own resident memory every 0.1 s. Each mode gets an
empty cache, so both really compute. Prints, per mode: the server's idle and peak RSS while the job ran, its growth,
the worker's peak RSS (the kernel's count, reported per job) and the job's wall time; then the server's growth in
both modes and the wall-time ratio (what the worker's start-up adds).

    python benchmarks/bench_workers.py [DATA] [--methods padim,patchcore] [--image-size 256]
Without DATA it uses ../shared/data/mpdd/metal_plate when present, else sample_data/brick.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SERVER = """
import json, sys, threading, time
from pathlib import Path
isolation, data, methods, size = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
from dashboard import services
from engine.runner import RunConfig

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

services.dataset_info(data)
jm = services.JobManager(isolation=isolation)
idle = rss_mb()
peak = idle
t0 = time.time()
job = jm.submit("bench", data, RunConfig(methods=methods, image_size=size))
while job.active:
    peak = max(peak, rss_mb())
    time.sleep(0.1)
wall = time.time() - t0
worker = job.worker.peak_mb if job.worker else None
print(json.dumps({"isolation": isolation, "state": job.state, "error": job.error, "idle_mb": round(idle, 1),
                  "peak_mb": round(peak, 1), "worker_peak_mb": worker, "wall_s": round(wall, 1),
                  "fit_s": sum((r.get("timing") or {}).get("fit_s") or 0 for r in job.records)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?")
    ap.add_argument("--methods", default="padim,patchcore")
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    shared = ROOT.parent / "shared" / "data" / "mpdd" / "metal_plate"
    data = args.data or str(shared if shared.exists() else ROOT / "sample_data" / "brick")
    rows = []
    for isolation in ("thread", "process"):
        env = {**os.environ, "ADLAB_CACHE": tempfile.mkdtemp(prefix="adlab-bench-workers-"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        out = subprocess.run([sys.executable, "-c", _SERVER, isolation, data, args.methods, str(args.image_size)],
                             env=env, cwd=ROOT, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{isolation}: the server process failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"data: {data}  methods: {args.methods}  image size: {args.image_size}")
    print(f"{'jobs in':<8} {'state':<6} {'server idle MB':>14} {'server peak MB':>14} {'growth MB':>9} "
          f"{'worker peak MB':>14} {'wall s':>7}")
    for r in rows:
        worker = "-" if r["worker_peak_mb"] is None else f"{r['worker_peak_mb']:.0f}"
        print(f"{r['isolation']:<8} {r['state']:<6} {r['idle_mb']:>14.0f} {r['peak_mb']:>14.0f} "
              f"{r['peak_mb'] - r['idle_mb']:>9.0f} {worker:>14} {r['wall_s']:>7.1f}")
    thread, proc = rows
    growth_t, growth_p = thread["peak_mb"] - thread["idle_mb"], proc["peak_mb"] - proc["idle_mb"]
    print(f"server growth while training: {growth_t:.0f} MB with jobs in threads, {growth_p:.0f} MB with jobs in "
          f"workers ({growth_p / max(proc['idle_mb'], 1.0):.1%} of its idle size)")
    print(f"job wall time, process / thread: {proc['wall_s'] / max(thread['wall_s'], 1e-9):.2f}x "
          "(process includes the worker's start-up: a fresh interpreter importing torch and the engine)")


if __name__ == "__main__":
    main()
